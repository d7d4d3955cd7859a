"""Drives the agent's Workload API with py-spiffe (PyPI `spiffe`), as a Python workload would.

Usage: py_spiffe_client.py SOCKET_PATH AUDIENCE
Prints one `key=value` line per fact; the Rust test asserts on them.
"""
import sys

from spiffe import TrustDomain, WorkloadApiClient


def main() -> None:
    socket, audience = sys.argv[1], sys.argv[2]
    with WorkloadApiClient(f"unix://{socket}", default_timeout=10) as client:
        svid = client.fetch_x509_svid()
        print(f"x509_spiffe_id={svid.spiffe_id}")
        print(f"x509_chain_len={len(svid.cert_chain)}")
        print(f"x509_serial={svid.leaf.serial_number:032x}")
        ctx = client.fetch_x509_context()
        td = TrustDomain("example.org")
        bundle = ctx.x509_bundle_set.get_bundle_for_trust_domain(td)
        print(f"x509_bundle_authorities={len(bundle.x509_authorities)}")
        bundles = client.fetch_x509_bundles()
        print(f"x509_bundles_has_td={bundles.get_bundle_for_trust_domain(td) is not None}")
        jwt = client.fetch_jwt_svid(audience={audience})
        print(f"jwt_spiffe_id={jwt.spiffe_id}")
        validated = client.validate_jwt_svid(jwt.token, audience)
        print(f"jwt_validated_spiffe_id={validated.spiffe_id}")
        jwt_bundles = client.fetch_jwt_bundles()
        jb = jwt_bundles.get_bundle_for_trust_domain(td)
        print(f"jwt_bundle_keys={len(jb.jwt_authorities)}")
        try:
            client.validate_jwt_svid(jwt.token, "some-other-audience")
            print("wrong_audience=accepted")
        except Exception as e:  # the client raises its own error types
            print(f"wrong_audience=refused:{type(e).__name__}")


if __name__ == "__main__":
    main()
