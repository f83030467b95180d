"""The mesh PKI. Import the module you need; this package imports nothing.

identity      SpiffeId, workload_identity(), IdentityCache: who a peer is
pem           reading/writing PEM files; PemError names the file
profile       the extensions of root, intermediate and workload certificates
ca            CertificateAuthority: init, init_intermediate, load, sign_csr
issue         new_key, make_csr, issue_workload: the workload side
bundle        TrustBundle: several roots, for CA rotation
ssl_context   server/client mTLS contexts, TlsContextSource (reloadable)
session_cache client-side TLS session resumption per upstream address
rotation      FileWatcher (reload on changed files), renew_at()
describe      certificates as JSON-ready facts
testing       make_test_pki(): a CA with good and deliberately bad certs, for tests
"""
