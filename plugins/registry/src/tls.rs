//! rustls client configurations from a host's `ca`, `client` and `skip_verify` settings.
//!
//! berth uses the `ring` crypto provider explicitly (no process-wide default), and the
//! system's roots (`/etc/ssl/certs`) plus the host's CA files.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

use crate::error::{Error, Result};
use crate::hosts::RegistryHost;

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn tls_err(host: &RegistryHost, path: &Path, reason: impl ToString) -> Error {
    Error::Tls {
        host: host.host.clone(),
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// The rustls client configuration for `host`.
pub fn client_config(host: &RegistryHost) -> Result<rustls::ClientConfig> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_err(host, Path::new("-"), e))?;
    let builder = if host.skip_verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAny(provider())))
    } else {
        let mut roots = rustls::RootCertStore::empty();
        // Unreadable system certificates only narrow what is trusted.
        let native = rustls_native_certs::load_native_certs();
        for cert in native.certs {
            let _ = roots.add(cert);
        }
        for ca in &host.ca {
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(ca)
                .map_err(|e| tls_err(host, ca, format!("reading the CA file: {e}")))?
                .collect::<std::result::Result<_, _>>()
                .map_err(|e| tls_err(host, ca, format!("parsing the CA file: {e}")))?;
            if certs.is_empty() {
                return Err(tls_err(host, ca, "no PEM certificate in the CA file"));
            }
            for c in certs {
                roots
                    .add(c)
                    .map_err(|e| tls_err(host, ca, format!("unusable CA certificate: {e}")))?;
            }
        }
        builder.with_root_certificates(roots)
    };
    let mut config = match host.client.first() {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let key_path = key.as_deref().unwrap_or(cert);
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
                .map_err(|e| tls_err(host, cert, format!("reading the client certificate: {e}")))?
                .collect::<std::result::Result<_, _>>()
                .map_err(|e| tls_err(host, cert, format!("parsing the client certificate: {e}")))?;
            let key = PrivateKeyDer::from_pem_file(key_path)
                .map_err(|e| tls_err(host, key_path, format!("reading the client key: {e}")))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| tls_err(host, cert, format!("client certificate and key: {e}")))?
        }
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// `skip_verify`: any certificate is accepted, but handshake signatures are still checked so
/// the connection is at least to the holder of the presented key.
#[derive(Debug)]
struct AcceptAny(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
