//! rumqttd's auth hook: after the guard has read a CONNECT (and who the client claims to be),
//! the password is checked against the address the guard saw, then the session is admitted
//! ([`super::admission`]); a refusal becomes the CONNACK code that says why.

use rumqttd::protocol::ConnectReturnCode;

use super::admission::{Admission, SessionRefusal};
use crate::auth::{Authenticator, LoginRefusal};
use crate::metrics::Metrics;

use super::guard::short;

/// Why the auth hook refused a CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ConnectRefusal {
    Login(LoginRefusal),
    Session(SessionRefusal),
    /// The guard never saw this CONNECT (its entry was dropped under a flood): try again.
    Unseen,
}

/// The auth hook: the password (with the address the guard saw), then the session.
pub(super) async fn admit(
    auth: &Authenticator,
    admission: &Admission,
    metrics: &Metrics,
    client_id: &str,
    user: &str,
    password: &str,
) -> Result<(), ConnectRefusal> {
    let Some(peer) = admission.peer_of(client_id, user, password) else {
        metrics.login_refused("unseen");
        return Err(ConnectRefusal::Unseen);
    };
    let principal = auth
        .verify_from(peer, user, password)
        .await
        .map_err(ConnectRefusal::Login)?;
    admission
        .admit(&principal, client_id, user, password)
        .map_err(|refusal| {
            metrics.login_refused(refusal.reason());
            tracing::info!(
                client_id = %short(client_id),
                user = %short(user),
                reason = refusal.reason(),
                "refused CONNECT"
            );
            ConnectRefusal::Session(refusal)
        })
}

/// The CONNACK a refusal gets (MQTT 3.1.1 §3.2.2.3).
pub(super) fn connack_code(refusal: ConnectRefusal) -> ConnectReturnCode {
    match refusal {
        ConnectRefusal::Login(LoginRefusal::UnknownUser | LoginRefusal::BadPassword) => {
            ConnectReturnCode::BadUserNamePassword
        }
        ConnectRefusal::Login(
            LoginRefusal::Anonymous
            | LoginRefusal::LockedOut
            | LoginRefusal::AddressLockedOut
            | LoginRefusal::RelayToWardBroker,
        ) => ConnectReturnCode::NotAuthorized,
        ConnectRefusal::Login(LoginRefusal::Busy) | ConnectRefusal::Unseen => {
            ConnectReturnCode::ServiceUnavailable
        }
        ConnectRefusal::Session(s) if s.identifier_rejected() => {
            ConnectReturnCode::ClientIdentifierNotValid
        }
        ConnectRefusal::Session(_) => ConnectReturnCode::ServiceUnavailable,
    }
}
