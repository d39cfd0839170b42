//! Throwaway certificates for TLS tests: a CA, a server certificate for localhost and
//! 127.0.0.1, a client certificate signed by the CA, and a client certificate signed
//! by an unrelated CA (which a server trusting only the first must refuse).

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, RevocationReason,
    RevokedCertParams, SerialNumber, date_time_ymd,
};

/// PEM files written under one directory.
pub struct TestPki {
    /// The CA certificate clients and servers trust.
    pub ca: PathBuf,
    /// Server certificate (localhost, 127.0.0.1) and key.
    pub server_cert: PathBuf,
    /// A certificate for both ends (localhost, 127.0.0.1; server and client use), as an
    /// instance that also forwards to other instances needs, and its key.
    pub member_cert: PathBuf,
    /// Key of `member_cert`.
    pub member_key: PathBuf,
    /// Key of `server_cert`.
    pub server_key: PathBuf,
    /// Client certificate signed by `ca`, and its key.
    pub client_cert: PathBuf,
    /// Key of `client_cert`.
    pub client_key: PathBuf,
    /// Client certificate signed by another CA, and its key.
    pub rogue_cert: PathBuf,
    /// Key of `rogue_cert`.
    pub rogue_key: PathBuf,
    /// Client certificate signed by `ca` and listed in `crl`.
    pub revoked_cert: PathBuf,
    /// Key of `revoked_cert`.
    pub revoked_key: PathBuf,
    /// A CRL signed by `ca` that revokes `revoked_cert` (PEM).
    pub crl: PathBuf,
}

/// Serial number of the revoked client certificate.
const REVOKED_SERIAL: u64 = 0x5eed_cafe;

fn ca(name: &str) -> (CertificateParams, KeyPair, String) {
    let key = KeyPair::generate().expect("ca key");
    let mut p = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    p.distinguished_name.push(DnType::CommonName, name);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let pem = p.self_signed(&key).expect("self-sign ca").pem();
    (p, key, pem)
}

fn leaf(
    names: &[&str],
    usage: ExtendedKeyUsagePurpose,
    issuer: &Issuer<'_, KeyPair>,
) -> (String, String) {
    leaf_with_serial(names, &[usage], issuer, None)
}

fn leaf_with_serial(
    names: &[&str],
    usages: &[ExtendedKeyUsagePurpose],
    issuer: &Issuer<'_, KeyPair>,
    serial: Option<u64>,
) -> (String, String) {
    let key = KeyPair::generate().expect("leaf key");
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    let mut p = CertificateParams::new(names).expect("leaf params");
    p.serial_number = serial.map(SerialNumber::from);
    p.distinguished_name.push(DnType::CommonName, "pgetcd-test");
    p.extended_key_usages = usages.to_vec();
    let cert = p.signed_by(&key, issuer).expect("sign leaf");
    (cert.pem(), key.serialize_pem())
}

impl TestPki {
    /// Generates everything into `dir`.
    pub fn generate(dir: &Path) -> TestPki {
        std::fs::create_dir_all(dir).expect("pki dir");
        let (ca_params, ca_key, ca_pem) = ca("pgetcd test CA");
        let issuer = Issuer::new(ca_params, ca_key);
        let (rogue_params, rogue_key, _) = ca("rogue CA");
        let rogue_issuer = Issuer::new(rogue_params, rogue_key);
        let server = leaf(
            &["localhost", "127.0.0.1"],
            ExtendedKeyUsagePurpose::ServerAuth,
            &issuer,
        );
        let member = leaf_with_serial(
            &["localhost", "127.0.0.1"],
            &[
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            &issuer,
            None,
        );
        let client = leaf(&["client"], ExtendedKeyUsagePurpose::ClientAuth, &issuer);
        let rogue = leaf(
            &["client"],
            ExtendedKeyUsagePurpose::ClientAuth,
            &rogue_issuer,
        );
        let revoked = leaf_with_serial(
            &["client"],
            &[ExtendedKeyUsagePurpose::ClientAuth],
            &issuer,
            Some(REVOKED_SERIAL),
        );
        let crl = CertificateRevocationListParams {
            this_update: date_time_ymd(2024, 1, 1),
            next_update: date_time_ymd(2099, 1, 1),
            crl_number: SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs: vec![RevokedCertParams {
                serial_number: SerialNumber::from(REVOKED_SERIAL),
                revocation_time: date_time_ymd(2024, 1, 1),
                reason_code: Some(RevocationReason::KeyCompromise),
                invalidity_date: None,
            }],
            key_identifier_method: KeyIdMethod::Sha256,
        }
        .signed_by(&issuer)
        .expect("sign crl")
        .pem()
        .expect("crl pem");
        let write = |name: &str, pem: &str| {
            let p = dir.join(name);
            std::fs::write(&p, pem).expect("write pem");
            p
        };
        TestPki {
            ca: write("ca.pem", &ca_pem),
            server_cert: write("server.pem", &server.0),
            server_key: write("server-key.pem", &server.1),
            member_cert: write("member.pem", &member.0),
            member_key: write("member-key.pem", &member.1),
            client_cert: write("client.pem", &client.0),
            client_key: write("client-key.pem", &client.1),
            rogue_cert: write("rogue.pem", &rogue.0),
            rogue_key: write("rogue-key.pem", &rogue.1),
            revoked_cert: write("revoked.pem", &revoked.0),
            revoked_key: write("revoked-key.pem", &revoked.1),
            crl: write("crl.pem", &crl),
        }
    }
}
