//! PEM encoding and decoding (decoding via rustls-pki-types).

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

/// Errors reading PEM.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PemError {
    /// Not valid PEM, or a block is truncated.
    #[error("invalid PEM: {0}")]
    Invalid(String),
    /// Valid PEM, but no block of the wanted kind.
    #[error("no {0} block found")]
    Missing(&'static str),
}

/// Encodes one PEM block with 64-character lines.
pub fn encode(label: &str, der: &[u8]) -> String {
    let b64 = STANDARD.encode(der);
    let mut out = String::with_capacity(b64.len() + b64.len() / 64 + 2 * label.len() + 40);
    out.push_str("-----BEGIN ");
    out.push_str(label);
    out.push_str("-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str("-----END ");
    out.push_str(label);
    out.push_str("-----\n");
    out
}

/// Encodes certificates as concatenated `CERTIFICATE` blocks.
pub fn encode_certs<'a>(certs: impl IntoIterator<Item = &'a [u8]>) -> String {
    certs.into_iter().map(|c| encode("CERTIFICATE", c)).collect()
}

/// Decodes every `CERTIFICATE` block; at least one is required.
pub fn decode_certs(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, PemError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PemError::Invalid(e.to_string()))?;
    if certs.is_empty() {
        return Err(PemError::Missing("CERTIFICATE"));
    }
    Ok(certs)
}

/// Decodes exactly one `CERTIFICATE REQUEST` (PKCS#10) block, as Istio's CA API and
/// cert-manager send CSRs; anything before or after the block is refused.
pub fn decode_csr(pem: &[u8]) -> Result<Vec<u8>, PemError> {
    let mut blocks = rustls_pki_types::CertificateSigningRequestDer::pem_slice_iter(pem);
    let first = match blocks.next() {
        Some(b) => b.map_err(|e| PemError::Invalid(e.to_string()))?,
        None => return Err(PemError::Missing("CERTIFICATE REQUEST")),
    };
    if blocks.next().is_some() {
        return Err(PemError::Invalid("more than one CERTIFICATE REQUEST block".into()));
    }
    Ok(first.as_ref().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_pem_round_trips() {
        let der = vec![0x30, 0x03, 0x02, 0x01, 0x05];
        let pem = encode_certs([der.as_slice(), der.as_slice()]);
        let back = decode_certs(pem.as_bytes()).unwrap();
        assert_eq!(back.len(), 2);
        assert_eq!(back[0].as_ref(), der.as_slice());
    }

    #[test]
    fn truncated_pem_is_an_error_not_a_short_read() {
        let pem = encode("CERTIFICATE", &[1, 2, 3, 4, 5, 6]);
        let cut = &pem[..pem.len() - 10];
        assert!(decode_certs(cut.as_bytes()).is_err());
        assert!(matches!(decode_certs(b"hello").unwrap_err(), PemError::Missing(_)));
    }

    #[test]
    fn one_csr_block_is_decoded_and_anything_else_refused() {
        let one = encode("CERTIFICATE REQUEST", &[1, 2, 3]);
        assert_eq!(decode_csr(one.as_bytes()).unwrap(), vec![1, 2, 3]);
        assert!(matches!(decode_csr(encode("CERTIFICATE", &[1]).as_bytes()), Err(PemError::Missing(_))));
        let two = format!("{one}{one}");
        assert!(matches!(decode_csr(two.as_bytes()), Err(PemError::Invalid(_))));
        assert!(decode_csr(&one.as_bytes()[..one.len() - 12]).is_err());
    }
}
