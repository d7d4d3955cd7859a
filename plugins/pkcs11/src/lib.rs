//! The `pkcs11` key manager: Tessera's CA keys are generated inside an HSM (any PKCS#11
//! module: a network HSM, a YubiHSM, SoftHSM2 for tests) and every signature is made there.
//! The private key never leaves the token: keys are created `CKA_SENSITIVE`, not
//! `CKA_EXTRACTABLE`, and Tessera keeps only their labels.
//!
//! Signing: EC keys use `CKM_ECDSA` over a digest computed here (SHA-256 for P-256, SHA-384 for
//! P-384; many tokens, SoftHSM2 among them, offer no combined hash-and-sign EC mechanism) and
//! the token's raw `r || s` is re-encoded as the DER X.509 needs. RSA keys use
//! `CKM_SHA256_RSA_PKCS`.
//!
//! What it is not: no token administration (initialize the token and its PIN with your HSM's
//! tools, e.g. `softhsm2-util --init-token`), no wrapped-key import or backup.
//!
//! Its configuration section (`[key_manager] type = "pkcs11"`) is parsed here ([`settings`]).

#![forbid(unsafe_code)]

mod settings;

pub use settings::{KEYS, Pkcs11Settings, RawPkcs11Settings};

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;

use async_trait::async_trait;
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType as CkKeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;
use tessera_identity::KeyType;
use tessera_plugins::{CaKey, KeyManager, KeyManagerError};

/// DER OIDs for `CKA_EC_PARAMS`.
const P256_OID: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const P384_OID: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];

/// Where the token is and how to log in.
#[derive(Clone, PartialEq, Eq)]
pub struct Pkcs11Config {
    /// The PKCS#11 module (`.so`), e.g. `/usr/lib/softhsm/libsofthsm2.so`.
    pub module_path: PathBuf,
    /// The label of the token holding the keys.
    pub token_label: String,
    /// The user PIN. Read from a file or the environment by the caller; never logged.
    pub pin: tessera_identity::Secret,
    /// Prefix of the key labels (`<prefix><slot id>`), so several servers can share a token.
    pub key_label_prefix: String,
}

impl fmt::Debug for Pkcs11Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pkcs11Config")
            .field("module_path", &self.module_path)
            .field("token_label", &self.token_label)
            .field("pin", &"<redacted>")
            .field("key_label_prefix", &self.key_label_prefix)
            .finish()
    }
}

/// Errors opening the token. Never carry the PIN.
#[derive(Debug)]
pub struct OpenError(String);

impl fmt::Display for OpenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pkcs11: {}", self.0)
    }
}

impl std::error::Error for OpenError {}

struct Token {
    session: Mutex<Session>,
}

/// The loaded modules, one per path, initialized once and never finalized: `C_Finalize`
/// from one user would pull the module from under every other.
fn module(path: &Path) -> Result<Pkcs11, OpenError> {
    static MODULES: OnceLock<Mutex<HashMap<PathBuf, Pkcs11>>> = OnceLock::new();
    let mut all = MODULES.get_or_init(|| Mutex::new(HashMap::new())).lock();
    if let Some(m) = all.get(path) {
        return Ok(m.clone());
    }
    let ctx = Pkcs11::new(path).map_err(|e| OpenError(format!("loading module {}: {e}", path.display())))?;
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(cryptoki::error::Error::Pkcs11(cryptoki::error::RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => return Err(OpenError(format!("C_Initialize: {e}"))),
    }
    all.insert(path.to_owned(), ctx.clone());
    Ok(ctx)
}

/// The `pkcs11` key manager.
pub struct Pkcs11KeyManager {
    token: Arc<Token>,
    prefix: String,
    token_label: String,
}

impl fmt::Debug for Pkcs11KeyManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pkcs11KeyManager").field("token", &self.token_label).field("prefix", &self.prefix).finish()
    }
}

fn gen_err(kt: KeyType) -> impl Fn(cryptoki::error::Error) -> KeyManagerError {
    move |e| KeyManagerError::Generate(kt, e.to_string())
}

fn corrupt(id: &str, reason: impl fmt::Display) -> KeyManagerError {
    KeyManagerError::Corrupt { id: id.to_owned(), reason: reason.to_string() }
}

impl Pkcs11KeyManager {
    /// Loads the module, finds the token by label, opens a read-write session and logs in.
    pub fn open(cfg: &Pkcs11Config) -> Result<Self, OpenError> {
        let e = |what: &str| {
            let what = what.to_owned();
            move |err: cryptoki::error::Error| OpenError(format!("{what}: {err}"))
        };
        if !Path::new(&cfg.module_path).exists() {
            return Err(OpenError(format!("module {} does not exist", cfg.module_path.display())));
        }
        let ctx = module(&cfg.module_path)?;
        let mut found = None;
        for slot in ctx.get_slots_with_token().map_err(e("listing slots"))? {
            let info = ctx.get_token_info(slot).map_err(e("reading token info"))?;
            if info.label().trim_end() == cfg.token_label {
                found = Some(slot);
                break;
            }
        }
        let slot = found.ok_or_else(|| OpenError(format!("no token labelled {:?}", cfg.token_label)))?;
        let session = ctx.open_rw_session(slot).map_err(e("opening a session"))?;
        match session.login(UserType::User, Some(&AuthPin::new(cfg.pin.expose().to_owned().into()))) {
            Ok(()) | Err(cryptoki::error::Error::Pkcs11(cryptoki::error::RvError::UserAlreadyLoggedIn, _)) => {}
            Err(err) => return Err(OpenError(format!("login to token {:?} failed: {err}", cfg.token_label))),
        }
        Ok(Self {
            token: Arc::new(Token { session: Mutex::new(session) }),
            prefix: cfg.key_label_prefix.clone(),
            token_label: cfg.token_label.clone(),
        })
    }

    fn label(&self, id: &str) -> Vec<u8> {
        format!("{}{id}", self.prefix).into_bytes()
    }

    fn session(&self) -> parking_lot::MutexGuard<'_, Session> {
        self.token.session.lock()
    }

    fn find(&self, s: &Session, id: &str, class: ObjectClass) -> Result<Vec<ObjectHandle>, KeyManagerError> {
        s.find_objects(&[Attribute::Token(true), Attribute::Class(class), Attribute::Label(self.label(id))])
            .map_err(|e| corrupt(id, format!("finding objects: {e}")))
    }

    /// Reads the key pair in slot `id` from the token.
    fn load(&self, s: &Session, id: &str) -> Result<Option<Pkcs11Key>, KeyManagerError> {
        let (Some(private), Some(public)) = (
            self.find(s, id, ObjectClass::PRIVATE_KEY)?.first().copied(),
            self.find(s, id, ObjectClass::PUBLIC_KEY)?.first().copied(),
        ) else {
            return Ok(None);
        };
        let attrs = s
            .get_attributes(
                public,
                &[
                    AttributeType::KeyType,
                    AttributeType::EcParams,
                    AttributeType::EcPoint,
                    AttributeType::Modulus,
                    AttributeType::PublicExponent,
                ],
            )
            .map_err(|e| corrupt(id, format!("reading the public key: {e}")))?;
        let (mut kt, mut params, mut point, mut n, mut exp) = (None, None, None, None, None);
        for a in attrs {
            match a {
                Attribute::KeyType(k) => kt = Some(k),
                Attribute::EcParams(p) => params = Some(p),
                Attribute::EcPoint(p) => point = Some(p),
                Attribute::Modulus(m) => n = Some(m),
                Attribute::PublicExponent(x) => exp = Some(x),
                _ => {}
            }
        }
        let (key_type, public_raw) = match kt {
            Some(CkKeyType::EC) => {
                let kt = match params.as_deref() {
                    Some(P256_OID) => KeyType::EcP256,
                    Some(P384_OID) => KeyType::EcP384,
                    _ => return Err(corrupt(id, "EC key on a curve Tessera does not use")),
                };
                let point = point.ok_or_else(|| corrupt(id, "no CKA_EC_POINT"))?;
                let raw = tessera_identity::der::unwrap_octet_string(&point)
                    .ok_or_else(|| corrupt(id, "CKA_EC_POINT is not a DER OCTET STRING"))?;
                (kt, raw.to_vec())
            }
            Some(CkKeyType::RSA) => {
                let (n, e) = n.zip(exp).ok_or_else(|| corrupt(id, "RSA key without modulus or exponent"))?;
                let kt = match n.len() {
                    256 | 257 => KeyType::Rsa2048,
                    384 | 385 => KeyType::Rsa3072,
                    l => return Err(corrupt(id, format!("RSA modulus of {l} bytes"))),
                };
                (kt, tessera_identity::der::rsa_public_key(&n, &e))
            }
            _ => return Err(corrupt(id, "not an EC or RSA key")),
        };
        Ok(Some(Pkcs11Key { id: id.to_owned(), key_type, public_raw, handle: private, token: self.token.clone() }))
    }
}

#[async_trait]
impl KeyManager for Pkcs11KeyManager {
    async fn generate_key(&self, id: &str, key_type: KeyType) -> Result<Arc<dyn CaKey>, KeyManagerError> {
        check_key_id(id)?;
        let s = self.session();
        // Replace: the slot's old pair goes first.
        for class in [ObjectClass::PRIVATE_KEY, ObjectClass::PUBLIC_KEY] {
            for h in self.find(&s, id, class)? {
                s.destroy_object(h).map_err(gen_err(key_type))?;
            }
        }
        let label = self.label(id);
        let common = [Attribute::Token(true), Attribute::Label(label.clone()), Attribute::Id(id.as_bytes().to_vec())];
        let private = [
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Sign(true),
        ];
        let (mech, public) = match key_type {
            KeyType::EcP256 | KeyType::EcP384 => {
                let oid = if key_type == KeyType::EcP256 { P256_OID } else { P384_OID };
                (Mechanism::EccKeyPairGen, vec![Attribute::Verify(true), Attribute::EcParams(oid.to_vec())])
            }
            KeyType::Rsa2048 | KeyType::Rsa3072 => {
                let bits: u64 = if key_type == KeyType::Rsa2048 { 2048 } else { 3072 };
                (
                    Mechanism::RsaPkcsKeyPairGen,
                    vec![
                        Attribute::Verify(true),
                        Attribute::ModulusBits(bits.into()),
                        Attribute::PublicExponent(vec![0x01, 0x00, 0x01]),
                    ],
                )
            }
        };
        let pub_t: Vec<Attribute> = common.iter().cloned().chain(public).collect();
        let priv_t: Vec<Attribute> = common.iter().cloned().chain(private).collect();
        s.generate_key_pair(&mech, &pub_t, &priv_t).map_err(gen_err(key_type))?;
        let key = self.load(&s, id)?.ok_or_else(|| corrupt(id, "generated key not found"))?;
        tracing::info!(slot = id, key_type = %key_type, token = %self.token_label, "CA key generated in the HSM");
        Ok(Arc::new(key))
    }

    async fn get_key(&self, id: &str) -> Result<Option<Arc<dyn CaKey>>, KeyManagerError> {
        check_key_id(id)?;
        let s = self.session();
        Ok(self.load(&s, id)?.map(|k| Arc::new(k) as Arc<dyn CaKey>))
    }

    fn name(&self) -> &'static str {
        "pkcs11"
    }
}

fn check_key_id(id: &str) -> Result<(), KeyManagerError> {
    let ok = !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok { Ok(()) } else { Err(KeyManagerError::InvalidKeyId(id.to_owned())) }
}

/// A key pair in the token: the public part copied out, the private part by handle.
pub struct Pkcs11Key {
    id: String,
    key_type: KeyType,
    public_raw: Vec<u8>,
    handle: ObjectHandle,
    token: Arc<Token>,
}

impl fmt::Debug for Pkcs11Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pkcs11Key").field("id", &self.id).field("key_type", &self.key_type).finish_non_exhaustive()
    }
}

impl CaKey for Pkcs11Key {
    fn id(&self) -> &str {
        &self.id
    }

    fn key_type(&self) -> KeyType {
        self.key_type
    }

    fn public_key_raw(&self) -> &[u8] {
        &self.public_raw
    }

    fn blocks(&self) -> bool {
        true
    }

    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, KeyManagerError> {
        let fail = |e: String| {
            tracing::warn!(slot = %self.id, error = %e, "HSM signature failed");
            KeyManagerError::Sign(self.id.clone())
        };
        let s = self.token.session.lock();
        match self.key_type {
            KeyType::EcP256 | KeyType::EcP384 => {
                let alg = if self.key_type == KeyType::EcP256 { &ring::digest::SHA256 } else { &ring::digest::SHA384 };
                let digest = ring::digest::digest(alg, msg);
                let raw = s.sign(&Mechanism::Ecdsa, self.handle, digest.as_ref()).map_err(|e| fail(e.to_string()))?;
                tessera_identity::der::ecdsa_fixed_to_der(&raw)
                    .ok_or_else(|| fail(format!("the token returned a {}-byte ECDSA signature", raw.len())))
            }
            KeyType::Rsa2048 | KeyType::Rsa3072 => {
                s.sign(&Mechanism::Sha256RsaPkcs, self.handle, msg).map_err(|e| fail(e.to_string()))
            }
        }
    }
}
