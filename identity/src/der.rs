//! The few DER encodings Tessera writes or reads by hand: ECDSA signatures (DER <-> fixed
//! r||s, as JOSE and PKCS#11 give them), SubjectPublicKeyInfo for keys that arrive as JWKs,
//! and the pieces an HSM returns (an RSA public key from modulus and exponent, an EC point in
//! an OCTET STRING).

/// Reads a DER length at `buf[*pos]`, advancing `pos`.
fn read_len(buf: &[u8], pos: &mut usize) -> Option<usize> {
    let first = *buf.get(*pos)?;
    *pos += 1;
    if first < 0x80 {
        return Some(usize::from(first));
    }
    let n = usize::from(first & 0x7f);
    if n == 0 || n > 2 {
        return None;
    }
    let mut len = 0usize;
    for _ in 0..n {
        len = (len << 8) | usize::from(*buf.get(*pos)?);
        *pos += 1;
    }
    Some(len)
}

pub(crate) fn read_tlv<'a>(buf: &'a [u8], pos: &mut usize, tag: u8) -> Option<&'a [u8]> {
    if *buf.get(*pos)? != tag {
        return None;
    }
    *pos += 1;
    let len = read_len(buf, pos)?;
    let v = buf.get(*pos..pos.checked_add(len)?)?;
    *pos += len;
    Some(v)
}

/// Converts an ECDSA signature from DER `SEQUENCE { r INTEGER, s INTEGER }` to JOSE's fixed
/// `r || s`, each left-padded to `scalar_len` bytes.
pub(crate) fn ecdsa_der_to_fixed(sig: &[u8], scalar_len: usize) -> Option<Vec<u8>> {
    let mut pos = 0;
    let seq = read_tlv(sig, &mut pos, 0x30)?;
    if pos != sig.len() {
        return None;
    }
    let mut p = 0;
    let r = read_tlv(seq, &mut p, 0x02)?;
    let s = read_tlv(seq, &mut p, 0x02)?;
    if p != seq.len() {
        return None;
    }
    let mut out = vec![0u8; scalar_len * 2];
    for (i, int) in [r, s].into_iter().enumerate() {
        let int = strip_leading_zeros(int);
        if int.len() > scalar_len {
            return None;
        }
        let start = i * scalar_len + (scalar_len - int.len());
        out.get_mut(start..start + int.len())?.copy_from_slice(int);
    }
    Some(out)
}

/// A fixed-width `r || s` ECDSA signature (PKCS#11 `CKM_ECDSA`, JOSE) as the DER
/// `ECDSA-Sig-Value` X.509 carries. `None` for an empty or odd-length input.
pub fn ecdsa_fixed_to_der(sig: &[u8]) -> Option<Vec<u8>> {
    if sig.is_empty() || !sig.len().is_multiple_of(2) {
        return None;
    }
    let (r, s) = sig.split_at(sig.len() / 2);
    let mut ints = Vec::with_capacity(sig.len() + 6);
    write_uint(&mut ints, r);
    write_uint(&mut ints, s);
    let mut out = Vec::with_capacity(ints.len() + 3);
    write_tlv(&mut out, 0x30, &ints);
    Some(out)
}

/// `RSAPublicKey ::= SEQUENCE { modulus, publicExponent }` from big-endian integers: the
/// subjectPublicKey bits of an RSA certificate.
pub fn rsa_public_key(n: &[u8], e: &[u8]) -> Vec<u8> {
    let mut ints = Vec::with_capacity(n.len() + e.len() + 8);
    write_uint(&mut ints, n);
    write_uint(&mut ints, e);
    let mut out = Vec::with_capacity(ints.len() + 4);
    write_tlv(&mut out, 0x30, &ints);
    out
}

/// The contents of a DER OCTET STRING, such as PKCS#11's `CKA_EC_POINT` (PKCS#11 v2.40
/// §2.3.3: "DER-encoding of ANSI X9.62 ECPoint value Q").
pub fn unwrap_octet_string(der: &[u8]) -> Option<&[u8]> {
    let mut pos = 0;
    let v = read_tlv(der, &mut pos, 0x04)?;
    (pos == der.len()).then_some(v)
}

fn strip_leading_zeros(mut b: &[u8]) -> &[u8] {
    while let [0, rest @ ..] = b {
        b = rest;
    }
    b
}

fn write_len(out: &mut Vec<u8>, len: usize) {
    if len < 0x80 {
        out.push(len as u8);
    } else if len < 0x100 {
        out.extend_from_slice(&[0x81, len as u8]);
    } else {
        out.extend_from_slice(&[0x82, (len >> 8) as u8, len as u8]);
    }
}

pub(crate) fn write_tlv(out: &mut Vec<u8>, tag: u8, value: &[u8]) {
    out.push(tag);
    write_len(out, value.len());
    out.extend_from_slice(value);
}

pub(crate) fn write_uint(out: &mut Vec<u8>, int: &[u8]) {
    let int = strip_leading_zeros(int);
    let mut v = Vec::with_capacity(int.len() + 1);
    if int.first().is_none_or(|b| b & 0x80 != 0) {
        v.push(0);
    }
    v.extend_from_slice(int);
    write_tlv(out, 0x02, &v);
}

/// DER of `AlgorithmIdentifier` for id-ecPublicKey with a named curve.
const EC_P256_ALG: &[u8] = &[
    0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03,
    0x01, 0x07,
];
const EC_P384_ALG: &[u8] =
    &[0x30, 0x10, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];
const RSA_ALG: &[u8] = &[0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00];

fn spki(alg: &[u8], key_bits: &[u8]) -> Vec<u8> {
    let mut bits = Vec::with_capacity(key_bits.len() + 1);
    bits.push(0); // no unused bits
    bits.extend_from_slice(key_bits);
    let mut body = alg.to_vec();
    write_tlv(&mut body, 0x03, &bits);
    let mut out = Vec::with_capacity(body.len() + 4);
    write_tlv(&mut out, 0x30, &body);
    out
}

/// SubjectPublicKeyInfo for an uncompressed EC point on P-256 (`p384 = false`) or P-384.
pub(crate) fn ec_spki(point: &[u8], p384: bool) -> Vec<u8> {
    spki(if p384 { EC_P384_ALG } else { EC_P256_ALG }, point)
}

/// SubjectPublicKeyInfo for an RSA key from its big-endian modulus and exponent.
pub(crate) fn rsa_spki(n: &[u8], e: &[u8]) -> Vec<u8> {
    spki(RSA_ALG, &rsa_public_key(n, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_width_signatures_round_trip_through_der() {
        let fixed = [0x80, 0, 0, 0xff, 0, 0, 0, 1];
        let der = ecdsa_fixed_to_der(&fixed).unwrap();
        // r gets a sign pad, s loses its leading zeros.
        assert_eq!(der, vec![0x30, 0x0a, 0x02, 0x05, 0x00, 0x80, 0, 0, 0xff, 0x02, 0x01, 0x01]);
        assert_eq!(ecdsa_der_to_fixed(&der, 4).unwrap(), fixed.to_vec());
        assert!(ecdsa_fixed_to_der(&[1, 2, 3]).is_none());
        assert!(ecdsa_fixed_to_der(&[]).is_none());
    }

    #[test]
    fn ec_points_are_unwrapped_from_octet_strings() {
        let point = [0x04, 1, 2, 3, 4];
        assert_eq!(unwrap_octet_string(&[0x04, 0x05, 0x04, 1, 2, 3, 4]).unwrap(), &point);
        assert!(unwrap_octet_string(&[0x04, 0x09, 0x04]).is_none(), "truncated input accepted");
    }

    #[test]
    fn ecdsa_der_signature_converts_to_fixed_width() {
        // r = 0x00ff (needs the sign pad), s = 0x01
        let der = [0x30, 0x07, 0x02, 0x02, 0x00, 0xff, 0x02, 0x01, 0x01];
        let fixed = ecdsa_der_to_fixed(&der, 4).unwrap();
        assert_eq!(fixed, vec![0, 0, 0, 0xff, 0, 0, 0, 1]);
        assert!(ecdsa_der_to_fixed(&der[..8], 4).is_none(), "truncated input accepted");
        assert!(ecdsa_der_to_fixed(&der, 0).is_none(), "oversized integer accepted");
    }
}
