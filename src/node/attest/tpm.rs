//! The node's half of attestation on its TPM (tss-esapi): the endorsement key, an attestation
//! key made for one session, credential activation, a quote, and a secret imported under the
//! EK and released only by a signed boot state. On a node the TPM is always the machine's
//! (`/dev/tpmrm0`, [`Tpm::machine`]); tests open a software TPM with [`Tpm::open`].

use crate::attest::tpm2;
use anyhow::{bail, Context as _, Result};
use std::str::FromStr;
use tss_esapi::abstraction::{ak, ek, AsymmetricAlgorithmSelection};
use tss_esapi::attributes::SessionAttributesBuilder;
use tss_esapi::constants::SessionType;
use tss_esapi::handles::{AuthHandle, KeyHandle, ObjectHandle, SessionHandle};
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, SignatureSchemeAlgorithm};
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::key_bits::RsaKeyBits;
use tss_esapi::interface_types::resource_handles::Hierarchy;
use tss_esapi::interface_types::session_handles::{AuthSession, PolicySession};
use tss_esapi::structures::{
    Data, Digest, EncryptedSecret, IdObject, Nonce, PcrSelectionListBuilder, PcrSlot, Private,
    Public, PublicKeyRsa, RsaSignature, Signature, SignatureScheme, SymmetricDefinition,
    SymmetricDefinitionObject,
};
use tss_esapi::tcti_ldr::{DeviceConfig, TctiNameConf};
use tss_esapi::traits::{Marshall, UnMarshall};

/// A TPM and the endorsement key made in it for this process.
pub struct Tpm {
    ctx: tss_esapi::Context,
    ek: KeyHandle,
    ek_public: Vec<u8>,
}

/// An attestation key loaded in the TPM, with its marshalled public area.
pub struct Ak {
    handle: KeyHandle,
    pub public: Vec<u8>,
}

/// A quote and the PCR values it covers.
pub struct QuoteOut {
    pub attest: Vec<u8>,
    pub signature: Vec<u8>,
    /// sha256 values in ascending PCR order.
    pub values: Vec<[u8; 32]>,
}

fn slot(index: u32) -> Result<PcrSlot> {
    let bit = 1u32
        .checked_shl(index)
        .filter(|_| index < 24)
        .with_context(|| format!("PCR {index} does not exist"))?;
    PcrSlot::try_from(bit).with_context(|| format!("PCR {index}"))
}

fn selection(pcrs: &[u32]) -> Result<tss_esapi::structures::PcrSelectionList> {
    let slots = pcrs.iter().map(|p| slot(*p)).collect::<Result<Vec<_>>>()?;
    PcrSelectionListBuilder::new()
        .with_selection(HashingAlgorithm::Sha256, &slots)
        .build()
        .context("building a PCR selection")
}

impl Tpm {
    /// The machine's TPM through the kernel's resource manager.
    pub fn machine() -> Result<Self> {
        let conf = TctiNameConf::Device(
            DeviceConfig::from_str(crate::node::agent::tpm::DEVICE).context("TPM device")?,
        );
        Self::open(conf)
    }

    /// Opens a TPM and creates its endorsement key (TCG default RSA 2048 template: the same key
    /// every time, from the endorsement seed).
    pub fn open(conf: TctiNameConf) -> Result<Self> {
        let mut ctx = tss_esapi::Context::new(conf).context("opening the TPM")?;
        let ek = ek::create_ek_object_2(
            &mut ctx,
            AsymmetricAlgorithmSelection::Rsa(RsaKeyBits::Rsa2048),
            None,
        )
        .context("creating the endorsement key (TCG default RSA 2048 template)")?;
        let (public, _, _) = ctx
            .read_public(ek)
            .context("reading the endorsement key's public area")?;
        let ek_public = public.marshall().context("encoding the endorsement key")?;
        Ok(Tpm { ctx, ek, ek_public })
    }

    /// The EK's marshalled TPMT_PUBLIC.
    pub fn ek_public(&self) -> &[u8] {
        &self.ek_public
    }

    /// A fresh policy session (sha256, AES-128-CFB).
    fn policy_session(&mut self, what: &str) -> Result<AuthSession> {
        self.ctx
            .start_auth_session(
                None,
                None,
                None,
                SessionType::Policy,
                SymmetricDefinition::AES_128_CFB,
                HashingAlgorithm::Sha256,
            )
            .with_context(|| format!("starting a policy session for {what}"))?
            .context("the TPM returned no session")
    }

    /// A policy session satisfying the EK's policy (PolicySecret on the endorsement hierarchy).
    fn ek_session(&mut self) -> Result<AuthSession> {
        let session = self.policy_session("the EK")?;
        let (attrs, mask) = SessionAttributesBuilder::new()
            .with_decrypt(true)
            .with_encrypt(true)
            .build();
        self.ctx
            .tr_sess_set_attributes(session, attrs, mask)
            .context("session attributes")?;
        let policy = PolicySession::try_from(session).context("policy session")?;
        self.ctx
            .execute_with_nullauth_session(|ctx| {
                ctx.policy_secret(
                    policy,
                    AuthHandle::Endorsement,
                    Nonce::default(),
                    Digest::default(),
                    Nonce::default(),
                    None,
                )
            })
            .context("PolicySecret on the endorsement hierarchy")?;
        Ok(session)
    }

    fn flush_session(&mut self, session: AuthSession) {
        let handle: SessionHandle = session.into();
        let _ = self.ctx.flush_context(handle.into());
    }

    /// Creates and loads an attestation key under the EK: ECDSA P-256 with SHA-256, restricted
    /// to signing what the TPM itself produced (quotes).
    pub fn create_ak(&mut self) -> Result<Ak> {
        let created = ak::create_ak_2(
            &mut self.ctx,
            self.ek,
            HashingAlgorithm::Sha256,
            AsymmetricAlgorithmSelection::Ecc(EccCurve::NistP256),
            SignatureSchemeAlgorithm::EcDsa,
            None,
            None,
        )
        .context("creating the attestation key")?;
        let public = created
            .out_public
            .marshall()
            .context("encoding the attestation key")?;
        let handle = ak::load_ak(
            &mut self.ctx,
            self.ek,
            None,
            created.out_private,
            created.out_public,
        )
        .context("loading the attestation key")?;
        Ok(Ak { handle, public })
    }

    /// TPM2_ActivateCredential: the secret a verifier protected for this EK and this AK.
    pub fn activate(&mut self, ak: &Ak, blob: &[u8], encrypted_seed: &[u8]) -> Result<Vec<u8>> {
        let blob = IdObject::try_from(blob.to_vec()).context("credential blob")?;
        let seed = EncryptedSecret::try_from(encrypted_seed.to_vec()).context("encrypted seed")?;
        let session = self.ek_session()?;
        self.ctx
            .set_sessions((Some(AuthSession::Password), Some(session), None));
        let out = self.ctx.activate_credential(ak.handle, self.ek, blob, seed);
        self.ctx.clear_sessions();
        self.flush_session(session);
        Ok(out
            .context("activating the credential (the verifier's challenge was not made for this TPM and key)")?
            .value()
            .to_vec())
    }

    /// Reads the sha256 values of `pcrs` (ascending), at most 8 per read.
    pub fn read_pcrs(&mut self, pcrs: &[u32]) -> Result<Vec<[u8; 32]>> {
        let mut sorted = pcrs.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        let mut out = Vec::new();
        for chunk in sorted.chunks(8) {
            let sel = selection(chunk)?;
            let (_, _, digests) = self
                .ctx
                .execute_without_session(|ctx| ctx.pcr_read(sel))
                .with_context(|| format!("reading PCRs {chunk:?}"))?;
            if digests.value().len() != chunk.len() {
                bail!(
                    "the TPM returned {} of {} PCRs",
                    digests.value().len(),
                    chunk.len()
                );
            }
            for d in digests.value() {
                out.push(<[u8; 32]>::try_from(d.value()).context("a PCR is not 32 bytes")?);
            }
        }
        Ok(out)
    }

    /// A quote by `ak` over `pcrs` (sha256) with `qualifying` data. PCRs can change between the
    /// read and the quote (a phase extended meanwhile): the values read must give the quoted
    /// digest, else both are done again (three tries).
    pub fn quote(&mut self, ak: &Ak, qualifying: &[u8], pcrs: &[u32]) -> Result<QuoteOut> {
        for _ in 0..3 {
            let values = self.read_pcrs(pcrs)?;
            let data = Data::try_from(qualifying.to_vec()).context("qualifying data")?;
            let sel = selection(pcrs)?;
            let (attest, signature) = self
                .ctx
                .execute_with_nullauth_session(|ctx| {
                    ctx.quote(ak.handle, data, SignatureScheme::Null, sel)
                })
                .context("quoting PCRs")?;
            let attest = attest.marshall().context("encoding the quote")?;
            let signature = signature.marshall().context("encoding the signature")?;
            let quote = tpm2::Quote::parse(&attest).context("the TPM's own quote")?;
            let mut h = <sha2::Sha256 as sha2::Digest>::new();
            for v in &values {
                sha2::Digest::update(&mut h, v);
            }
            if sha2::Digest::finalize(h).as_slice() == quote.pcr_digest {
                return Ok(QuoteOut {
                    attest,
                    signature,
                    values,
                });
            }
        }
        bail!("the PCRs kept changing while they were quoted (three tries)")
    }

    /// Extends a sha256 PCR with `digest` (keel-agent measures through systemd's tools; this is
    /// for software TPMs in tests, which play a boot's measurements).
    pub fn extend(&mut self, pcr: u32, digest: [u8; 32]) -> Result<()> {
        use tss_esapi::handles::PcrHandle;
        use tss_esapi::structures::DigestValues;
        let handle = PcrHandle::try_from(pcr).with_context(|| format!("PCR {pcr}"))?;
        let mut values = DigestValues::new();
        values.set(
            HashingAlgorithm::Sha256,
            Digest::try_from(digest.to_vec()).context("digest")?,
        );
        self.ctx
            .execute_with_nullauth_session(|ctx| ctx.pcr_extend(handle, values))
            .with_context(|| format!("extending PCR {pcr}"))
    }

    /// Imports a sealed object made for this TPM's EK and unseals it through its policy:
    /// PolicyPCR on PCR 11 approved by `key`'s signature `sig` over that policy (a `.pcrsig`
    /// entry), then PolicyPCR on `pcrs` (their current values). The TPM refuses unless PCR 11 is
    /// in the signed state and `pcrs` hold what the object was sealed to.
    pub fn unseal_imported(
        &mut self,
        blob: &tpm2::ImportBlob,
        key: &openssl::pkey::PKey<openssl::pkey::Public>,
        approved_policy: &[u8; 32],
        sig: &[u8],
        pcrs: &[u32],
    ) -> Result<zeroize_vec::Secret> {
        let public = Public::unmarshall(&blob.public).context("the sealed object's public area")?;
        let duplicate = Private::try_from(blob.duplicate.clone()).context("the sealed object")?;
        let seed = EncryptedSecret::try_from(blob.encrypted_seed.clone()).context("its seed")?;
        let session = self.ek_session()?;
        self.ctx.set_sessions((Some(session), None, None));
        let private = self.ctx.import(
            self.ek.into(),
            None,
            public.clone(),
            duplicate,
            seed,
            SymmetricDefinitionObject::Null,
        );
        self.ctx.clear_sessions();
        self.flush_session(session);
        let private = private.context(
            "importing the sealed object (it was not sealed to this TPM's endorsement key)",
        )?;
        let session = self.ek_session()?;
        self.ctx.set_sessions((Some(session), None, None));
        let object = self.ctx.load(self.ek, private, public);
        self.ctx.clear_sessions();
        self.flush_session(session);
        let object = object.context("loading the sealed object")?;
        let result = self.policy_unseal(object.into(), key, approved_policy, sig, pcrs);
        let _ = self.ctx.flush_context(object.into());
        result
    }

    fn policy_unseal(
        &mut self,
        object: ObjectHandle,
        key: &openssl::pkey::PKey<openssl::pkey::Public>,
        approved_policy: &[u8; 32],
        sig: &[u8],
        pcrs: &[u32],
    ) -> Result<zeroize_vec::Secret> {
        let key_public = Public::unmarshall(&tpm2::rsa_verify_key_public(key)?)
            .context("the policy key as a TPM structure")?;
        let key_handle = self
            .ctx
            .execute_without_session(|ctx| ctx.load_external_public(key_public, Hierarchy::Owner))
            .context("loading the operator's policy key")?;
        let (_, key_name, _) = self
            .ctx
            .read_public(key_handle)
            .context("reading the policy key's name")?;
        let a_hash = <sha2::Sha256 as sha2::Digest>::digest(approved_policy);
        let signature = Signature::RsaSsa(
            RsaSignature::create(
                HashingAlgorithm::Sha256,
                PublicKeyRsa::try_from(sig.to_vec()).context("policy signature")?,
            )
            .context("policy signature")?,
        );
        let ticket = self.ctx.execute_without_session(|ctx| {
            ctx.verify_signature(
                key_handle,
                Digest::try_from(a_hash.to_vec()).unwrap_or_default(),
                signature,
            )
        });
        let _ = self.ctx.flush_context(key_handle.into());
        let ticket = ticket.context("the policy signature is not the operator's key's")?;
        let session = self.policy_session("the unseal")?;
        let policy = PolicySession::try_from(session).context("policy session")?;
        let steps = (|| -> Result<Vec<u8>> {
            let sel11 = selection(&[11])?;
            self.ctx
                .execute_without_session(|ctx| ctx.policy_pcr(policy, Digest::default(), sel11))
                .context("PolicyPCR on PCR 11")?;
            self.ctx
                .execute_without_session(|ctx| {
                    ctx.policy_authorize(
                        policy,
                        Digest::try_from(approved_policy.to_vec())?,
                        Nonce::default(),
                        &key_name,
                        ticket,
                    )
                })
                .context("PolicyAuthorize: PCR 11 is not in the state the signature approves")?;
            if !pcrs.is_empty() {
                let sel = selection(pcrs)?;
                self.ctx
                    .execute_without_session(|ctx| ctx.policy_pcr(policy, Digest::default(), sel))
                    .with_context(|| format!("PolicyPCR on PCRs {pcrs:?}"))?;
            }
            self.ctx.set_sessions((Some(session), None, None));
            let data = self.ctx.unseal(object);
            self.ctx.clear_sessions();
            Ok(data
                .context("unsealing (the TPM's PCRs are not the ones the object is sealed to)")?
                .value()
                .to_vec())
        })();
        self.flush_session(session);
        steps.map(zeroize_vec::Secret)
    }
}

impl Drop for Tpm {
    fn drop(&mut self) {
        let _ = self.ctx.flush_context(self.ek.into());
    }
}

impl Ak {
    pub fn flush(self, tpm: &mut Tpm) {
        let _ = tpm.ctx.flush_context(self.handle.into());
    }
}

/// A secret's bytes, overwritten when dropped.
pub mod zeroize_vec {
    pub struct Secret(pub Vec<u8>);

    impl Drop for Secret {
        fn drop(&mut self) {
            self.0.fill(0);
            // Kept observable so the overwrite is not optimised away.
            std::hint::black_box(&self.0);
        }
    }

    impl std::fmt::Debug for Secret {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "Secret({} bytes)", self.0.len())
        }
    }
}
