"""Parses a SPIFFE bundle document with py-spiffe and prints what it found, as JSON.

Usage: parse_bundle.py <trust domain> <bundle.json>

A SPIFFE bundle consumer first sorts keys by `use` (X509-SVID spec §6.2, JWT-SVID spec
§6.2). JWT authorities: the `jwt-svid` keys, as a JWKS, through py-spiffe's JwtBundle.parse.
(Given the whole document, JwtBundle.parse refuses it: it wants a `kid` on every key, and
the X509-SVID spec §6.1 says the `x509-svid` keys MUST NOT carry one.) X.509 authorities:
the first `x5c` of each `x509-svid` key, through py-spiffe's X509Bundle.parse_raw.
"""

import base64
import json
import sys

from spiffe import JwtBundle, TrustDomain, X509Bundle


def main() -> None:
    td = TrustDomain(sys.argv[1])
    with open(sys.argv[2], "rb") as f:
        raw = f.read()
    doc = json.loads(raw)
    jwt_keys = [k for k in doc["keys"] if k.get("use") == "jwt-svid"]
    jwt = JwtBundle.parse(td, json.dumps({"keys": jwt_keys}).encode())
    der = b"".join(
        base64.b64decode(k["x5c"][0]) for k in doc["keys"] if k.get("use") == "x509-svid"
    )
    x509 = X509Bundle.parse_raw(td, der)
    print(
        json.dumps(
            {
                "trust_domain": str(jwt.trust_domain),
                "jwt_key_ids": sorted(jwt.jwt_authorities.keys()),
                "x509_authorities": len(x509.x509_authorities),
                "x509_kids": [k["kid"] for k in doc["keys"] if k.get("use") == "x509-svid" and "kid" in k],
                "sequence": doc.get("spiffe_sequence"),
                "refresh_hint": doc.get("spiffe_refresh_hint"),
            }
        )
    )


if __name__ == "__main__":
    main()
