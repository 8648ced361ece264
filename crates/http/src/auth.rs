//! The auth step: who is asking (Basic credentials checked against the htpasswd file), and
//! may they do what this endpoint does to this name. Anonymous requests that need a login
//! get 401 with a challenge every client understands; known users without the right, 403.

use axum::http::request::Parts;
use axum::http::{Method, header};
use tessera_access::{Access, Action, Decision, Identity, Logins};
use tessera_spec::{ErrorCode, OciError, RepoName};

use crate::endpoint::Endpoint;

pub struct Auth {
    logins: Logins,
    access: Access,
    realm: String,
}

impl Auth {
    pub fn new(logins: Logins, access: Access, realm: String) -> Auth {
        Auth { logins, access, realm }
    }

    fn challenge(&self, message: &str) -> OciError {
        OciError::new(ErrorCode::Unauthorized, message)
            .with_header("www-authenticate", format!("Basic realm=\"{}\"", self.realm.replace('"', "")))
    }

    /// Who sent `parts`. Wrong credentials are refused outright (never downgraded to anonymous).
    pub fn identify(&self, parts: &Parts) -> Result<Identity, OciError> {
        let Some(value) = parts.headers.get(header::AUTHORIZATION) else { return Ok(Identity::Anonymous) };
        let value = value.to_str().map_err(|_| self.challenge("malformed credentials"))?;
        let (scheme, rest) = value.split_once(' ').unwrap_or((value, ""));
        if !scheme.eq_ignore_ascii_case("basic") {
            return Err(self.challenge("unsupported authorization scheme"));
        }
        use base64::Engine as _;
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(rest.trim())
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .ok_or_else(|| self.challenge("malformed credentials"))?;
        let (user, password) = decoded.split_once(':').ok_or_else(|| self.challenge("malformed credentials"))?;
        if self.logins.check(user, password) {
            Ok(Identity::User(user.to_string()))
        } else {
            tracing::info!(user, "login failed");
            Err(self.challenge("invalid username or password"))
        }
    }

    /// Checks that `who` may do what `method` on `endpoint` means. The base endpoint and the
    /// catalog need a login; repository endpoints need the action's right on the name.
    pub fn authorize(&self, who: &Identity, method: &Method, endpoint: &Endpoint) -> Result<(), OciError> {
        let (action, name): (Action, &RepoName) = match endpoint {
            Endpoint::Metrics => return Ok(()),
            Endpoint::Base | Endpoint::Catalog(_) => {
                return match who {
                    Identity::User(_) => Ok(()),
                    Identity::Anonymous
                        if self.anonymous_may_pull_somewhere() && matches!(endpoint, Endpoint::Base) =>
                    {
                        Ok(())
                    }
                    Identity::Anonymous => Err(self.challenge("authentication required")),
                };
            }
            Endpoint::Tags { name, .. } | Endpoint::Referrers { name, .. } => (Action::Pull, name),
            Endpoint::Manifest { name, .. } | Endpoint::Blob { name, .. } => match *method {
                Method::GET | Method::HEAD => (Action::Pull, name),
                Method::DELETE => (Action::Delete, name),
                _ => (Action::Push, name),
            },
            Endpoint::UploadStart { name, .. } | Endpoint::Upload { name, .. } => (Action::Push, name),
        };
        match self.access.decide(who, action, name.as_str()) {
            Decision::Allow => Ok(()),
            Decision::LogIn => Err(self.challenge("authentication required")),
            Decision::Deny => {
                Err(OciError::new(ErrorCode::Denied, format!("not allowed to {} {name}", action.as_str())))
            }
        }
    }

    /// Whether `who` may pull `name` (a cross-repository mount reads its source).
    pub fn may_pull(&self, who: &Identity, name: &RepoName) -> bool {
        self.access.decide(who, Action::Pull, name.as_str()) == Decision::Allow
    }

    /// Whether anonymous clients may pull anything: then `/v2/` answers them (clients probe
    /// it before anonymous pulls and would otherwise ask for credentials they do not have).
    fn anonymous_may_pull_somewhere(&self) -> bool {
        self.access.anonymous_pulls_somewhere()
    }
}
