//! Who the page is logged in as, from the broker's `GET /api/v1/whoami`: what it subscribes
//! to (a ward operator may read only its ward's part of the tree) and the role it signs its
//! acknowledgements with (the broker refuses an ack whose `by` is not the login's own name and
//! role). Without I/O, so it is tested natively.

use renkei_shared::{Role, WardCode, topic};
use serde::Deserialize;

/// The login the broker answered for.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Login {
    pub user: String,
    /// `None` in demo mode, where nobody logs in.
    pub role: Option<Role>,
    pub ward: Option<WardCode>,
}

/// Why a login cannot use the dashboard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoginError {
    Unreadable(String),
    NoWard,
    Role,
}

impl std::fmt::Display for LoginError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LoginError::Unreadable(e) => {
                write!(
                    f,
                    "the broker's answer to /api/v1/whoami does not parse: {e}"
                )
            }
            LoginError::NoWard => f.write_str("a ward operator's login without a ward"),
            LoginError::Role => f.write_str("this role cannot use the dashboard"),
        }
    }
}

impl Login {
    /// The login of an anonymous page in demo mode: it reads everything.
    pub fn demo() -> Login {
        Login {
            user: String::new(),
            role: None,
            ward: None,
        }
    }

    /// Parses the body of `GET /api/v1/whoami`.
    pub fn parse(body: &str) -> Result<Login, LoginError> {
        serde_json::from_str(body).map_err(|e| LoginError::Unreadable(e.to_string()))
    }

    /// The filters the page subscribes to: everything, or a ward operator's own part.
    pub fn filters(&self) -> Result<Vec<String>, LoginError> {
        match self.role {
            None | Some(Role::Hq | Role::Admin | Role::Integrator) => {
                Ok(vec![topic::ALL.to_owned()])
            }
            Some(Role::Ward) => {
                let ward = self.ward.ok_or(LoginError::NoWard)?;
                Ok(topic::ward_reader_filters(ward).to_vec())
            }
            // Agents publish for their site and may read only their commands and receipts; a
            // ward broker's relay is a machine login, not a person's.
            Some(Role::Agent | Role::Relay) => Err(LoginError::Role),
        }
    }

    /// The role the page's acknowledgements carry, if the login may send any: integrators
    /// only read. An anonymous demo page acknowledges as HQ.
    pub fn ack_role(&self) -> Option<Role> {
        match self.role {
            None => Some(Role::Hq),
            Some(role @ (Role::Hq | Role::Ward | Role::Admin)) => Some(role),
            Some(Role::Integrator | Role::Agent | Role::Relay) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ward_operator_reads_its_ward_and_acks_as_ward() {
        let login =
            Login::parse(r#"{"user":"tanaka","role":"ward","ward":131041}"#).expect("parses");
        assert_eq!(login.user, "tanaka");
        assert_eq!(
            login.filters().unwrap(),
            topic::ward_reader_filters(WardCode(131041)).to_vec()
        );
        assert!(!login.filters().unwrap().iter().any(|f| f == topic::ALL));
        assert_eq!(login.ack_role(), Some(Role::Ward));
    }

    #[test]
    fn hq_reads_everything_and_integrators_never_ack() {
        let hq = Login::parse(r#"{"user":"sato","role":"hq","ward":null}"#).unwrap();
        assert_eq!(hq.filters().unwrap(), vec![topic::ALL.to_owned()]);
        assert_eq!(hq.ack_role(), Some(Role::Hq));
        let reader = Login::parse(r#"{"user":"dis","role":"integrator","ward":null}"#).unwrap();
        assert_eq!(reader.filters().unwrap(), vec![topic::ALL.to_owned()]);
        assert_eq!(reader.ack_role(), None);
        assert_eq!(Login::demo().ack_role(), Some(Role::Hq));
    }

    #[test]
    fn odd_answers_are_errors_not_guesses() {
        assert!(matches!(
            Login::parse("<html>"),
            Err(LoginError::Unreadable(_))
        ));
        let agent = Login::parse(r#"{"user":"a","role":"agent","ward":131041}"#).unwrap();
        assert_eq!(agent.filters(), Err(LoginError::Role));
        let wardless = Login::parse(r#"{"user":"t","role":"ward","ward":null}"#).unwrap();
        assert_eq!(wardless.filters(), Err(LoginError::NoWard));
    }
}
