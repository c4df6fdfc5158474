use super::*;
use bytes::{Buf, BufMut, Bytes, BytesMut};

fn len() -> usize {
    // sesssion present + code
    1 + 1
}

pub fn read(fixed_header: FixedHeader, mut bytes: Bytes) -> Result<ConnAck, Error> {
    let variable_header_index = fixed_header.fixed_header_len;
    bytes.advance(variable_header_index);

    let flags = read_u8(&mut bytes)?;
    let return_code = read_u8(&mut bytes)?;

    let session_present = (flags & 0x01) == 1;
    let code = connect_return(return_code)?;
    let connack = ConnAck {
        session_present,
        code,
    };

    Ok(connack)
}

pub fn write(connack: &ConnAck, buffer: &mut BytesMut) -> Result<usize, Error> {
    let len = len();
    buffer.put_u8(0x20);

    let count = write_remaining_length(buffer, len)?;
    buffer.put_u8(connack.session_present as u8);
    buffer.put_u8(connect_code(connack.code));

    Ok(1 + count + len)
}

/// Connection return code type
fn connect_return(num: u8) -> Result<ConnectReturnCode, Error> {
    match num {
        0 => Ok(ConnectReturnCode::Success),
        1 => Ok(ConnectReturnCode::RefusedProtocolVersion),
        2 => Ok(ConnectReturnCode::ClientIdentifierNotValid),
        3 => Ok(ConnectReturnCode::ServiceUnavailable),
        4 => Ok(ConnectReturnCode::BadUserNamePassword),
        5 => Ok(ConnectReturnCode::NotAuthorized),
        num => Err(Error::InvalidConnectReturnCode(num)),
    }
}

/// Renkei patch: MQTT 3.1.1 has return codes 0 to 5 only. Upstream panicked on the others,
/// which an auth handler (`AuthVerdict::Refuse`) or a `Protocol` (`Error::ConnectRefused`)
/// may now give for a 3.1.1 client: each MQTT 5 reason is sent as the nearest 3.1.1 code.
fn connect_code(return_code: ConnectReturnCode) -> u8 {
    match return_code {
        ConnectReturnCode::Success => 0,
        ConnectReturnCode::RefusedProtocolVersion
        | ConnectReturnCode::UnsupportedProtocolVersion => 1,
        ConnectReturnCode::ClientIdentifierNotValid => 2,
        ConnectReturnCode::BadUserNamePassword | ConnectReturnCode::BadAuthenticationMethod => 4,
        ConnectReturnCode::NotAuthorized | ConnectReturnCode::Banned => 5,
        // The server cannot take this connection now (busy, over a quota, moved, failing).
        ConnectReturnCode::ServiceUnavailable
        | ConnectReturnCode::ServerUnavailable
        | ConnectReturnCode::ServerBusy
        | ConnectReturnCode::UseAnotherServer
        | ConnectReturnCode::ServerMoved
        | ConnectReturnCode::ConnectionRateExceeded
        | ConnectReturnCode::QuotaExceeded
        | ConnectReturnCode::UnspecifiedError
        | ConnectReturnCode::ImplementationSpecificError
        | ConnectReturnCode::MalformedPacket
        | ConnectReturnCode::ProtocolError
        | ConnectReturnCode::TopicNameInvalid
        | ConnectReturnCode::PacketTooLarge
        | ConnectReturnCode::PayloadFormatInvalid
        | ConnectReturnCode::RetainNotSupported
        | ConnectReturnCode::QoSNotSupported => 3,
    }
}

// Renkei patch: MQTT 3.1.1 has return codes 0 to 5 only.
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_reach_a_3_1_1_client_as_its_return_codes() {
        use ConnectReturnCode::*;
        let codes = [
            (Success, 0),
            (RefusedProtocolVersion, 1),
            (ClientIdentifierNotValid, 2),
            (ServiceUnavailable, 3),
            (BadUserNamePassword, 4),
            (NotAuthorized, 5),
            // MQTT 5 reasons, as the 3.1.1 code nearest to each.
            (UnsupportedProtocolVersion, 1),
            (ServerUnavailable, 3),
            (ServerBusy, 3),
            (QuotaExceeded, 3),
            (ConnectionRateExceeded, 3),
            (UnspecifiedError, 3),
            (BadAuthenticationMethod, 4),
            (Banned, 5),
        ];
        for (code, byte) in codes {
            let mut buffer = BytesMut::new();
            let connack = ConnAck {
                session_present: false,
                code,
            };
            write(&connack, &mut buffer).unwrap();
            assert_eq!(&buffer[..], &[0x20, 0x02, 0x00, byte], "{code:?}");
        }
    }
}
