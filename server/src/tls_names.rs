//! `--client-cert-allowed-hostname`, as etcd: once a client certificate has been
//! verified against `--trusted-ca-file` (and the CRL), its end-entity certificate must
//! also be valid for one of the allowed names, by the rules a client checks a server's
//! name with (Go's `VerifyHostname`, webpki's `verify_is_valid_for_subject_name`): a
//! DNS name in the subject alternative names, `*.` wildcards for one label, any case;
//! an IP address for an IP. The subject's common name is not looked at (Go stopped
//! doing so in 1.15; etcd 3.5 is built with a later Go). A certificate matching none is
//! refused **in the handshake** with a `bad_certificate` alert, as etcd's
//! `VerifyPeerCertificate` hook does ("client certificate authentication failed").

use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};

/// The refusal's cause, as etcd words it.
#[derive(Debug, thiserror::Error)]
#[error(
    "client certificate authentication failed: not valid for any --client-cert-allowed-hostname"
)]
struct NotAllowed;

/// A client certificate verifier that also requires one of the allowed names.
#[derive(Debug)]
pub(crate) struct AllowedHostnames {
    inner: Arc<dyn ClientCertVerifier>,
    names: Vec<ServerName<'static>>,
}

impl AllowedHostnames {
    /// `names` as given to the flag; each must be a DNS name or an IP address.
    pub(crate) fn new(
        inner: Arc<dyn ClientCertVerifier>,
        names: &[String],
    ) -> Result<AllowedHostnames, String> {
        let names = names
            .iter()
            .map(|n| {
                ServerName::try_from(n.trim().to_owned()).map_err(|_| {
                    format!(
                        "--client-cert-allowed-hostname: {n:?} is not a host name or IP address"
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(AllowedHostnames { inner, names })
    }

    /// Whether `cert` is valid for one of the names (its chain already verified).
    fn allows(&self, cert: &CertificateDer<'_>) -> bool {
        let Ok(cert) = webpki::EndEntityCert::try_from(cert) else {
            return false;
        };
        self.names
            .iter()
            .any(|n| cert.verify_is_valid_for_subject_name(n).is_ok())
    }
}

impl ClientCertVerifier for AllowedHostnames {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        if self.allows(end_entity) {
            Ok(verified)
        } else {
            Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                rustls::OtherError(Arc::new(NotAllowed)),
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn cert(names: &[&str], cn: &str) -> CertificateDer<'static> {
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().clone()
    }

    fn allowed(names: &[&str]) -> AllowedHostnames {
        // The name check does not consult the inner verifier.
        let inner = rustls::server::WebPkiClientVerifier::no_client_auth();
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        AllowedHostnames::new(inner, &names).unwrap()
    }

    #[test]
    fn names_match_as_go_verify_hostname() {
        let c = cert(
            &["client.example.com", "*.apps.example.com", "10.1.2.3"],
            "cn-only",
        );
        assert!(allowed(&["client.example.com"]).allows(&c));
        assert!(allowed(&["CLIENT.example.com"]).allows(&c));
        assert!(allowed(&["other", "x.apps.example.com"]).allows(&c));
        assert!(allowed(&["10.1.2.3"]).allows(&c));
        assert!(!allowed(&["a.b.apps.example.com"]).allows(&c));
        assert!(!allowed(&["10.1.2.4"]).allows(&c));
        // The common name alone does not count (Go >= 1.15).
        assert!(!allowed(&["cn-only"]).allows(&c));
        assert!(!allowed(&["example.com"]).allows(&c));
    }

    #[test]
    fn bad_names_are_start_up_errors() {
        let inner = rustls::server::WebPkiClientVerifier::no_client_auth();
        assert!(AllowedHostnames::new(inner, &["not a name".to_owned()]).is_err());
    }
}
