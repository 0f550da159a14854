//! The `sealpost` binary: `sealpost serve` runs a broker.

use std::io::Write;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use sealpost::config::{ServeArgs, Settings};

/// mimalloc: the broker allocates many small, short-lived buffers (frames, sled nodes) across
/// threads; measured faster than the system allocator on the e2e load test. Built with
/// `no_thp` (see Cargo.toml); on a host with THP `always`, also set `MIMALLOC_ALLOW_THP=0`.
/// Wrapped so that every freed block is zeroed first: buffers that carried a token or a
/// ciphertext do not stay readable in freed memory (see `gateway::secrets`).
#[cfg(not(feature = "system-allocator"))]
#[global_allocator]
static GLOBAL: zeroizing_alloc::ZeroAlloc<mimalloc::MiMalloc> =
    zeroizing_alloc::ZeroAlloc(mimalloc::MiMalloc);

/// With `--features system-allocator` (heap profiling): the system allocator, zeroizing too.
#[cfg(feature = "system-allocator")]
#[global_allocator]
static GLOBAL: zeroizing_alloc::ZeroAlloc<std::alloc::System> =
    zeroizing_alloc::ZeroAlloc(std::alloc::System);

/// Sealpost: a federated broker for end-to-end encrypted messages and call signaling.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the broker (defaults: 127.0.0.1:8080, ./sealpost-data, open registration).
    Serve(Box<ServeArgs>),
    /// Generate a platform Ed25519 key pair for registration = platform (prints both keys).
    PlatformKeygen,
    /// Print this broker's federation public key (base64), creating the key pair in the data
    /// directory if absent. Peers pin it in their `federation_peers`.
    FederationKey {
        /// Data directory of the broker.
        #[arg(long, env = "SEALPOST_DATA_DIR", default_value = "sealpost-data")]
        data_dir: std::path::PathBuf,
    },
    /// Create the broker's secrets, `server.key` and `federation.key` (mode 0600), in a
    /// directory, keeping any that exist: for a Kubernetes Secret that every pod of a
    /// scale-out deployment mounts as its `key_dir`. Prints the federation public key.
    Keygen {
        /// Where to write them.
        dir: std::path::PathBuf,
    },
    /// Mint a registration token for a handle, as the host platform would.
    MintToken {
        /// The platform's secret key, base64 (from `platform-keygen`).
        #[arg(long, env = "SEALPOST_PLATFORM_SECRET_KEY")]
        secret_key: String,
        /// The handle the token attests.
        #[arg(long)]
        handle: String,
        /// Validity in seconds.
        #[arg(long, default_value_t = 600)]
        ttl_secs: u64,
    },
}

fn main() -> anyhow::Result<()> {
    let matches = sealpost::config::document_defaults(Cli::command()).get_matches();
    let cli =
        Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.format(&mut Cli::command()).exit());
    match cli.command {
        Command::Serve(args) => {
            let settings = Settings::load(*args)?;
            // First, before any thread starts: the threads started later inherit it.
            let policy = sealpost::server::set_cpu_policy(settings.cpu_policy);
            sealpost::telemetry::init_tracing(&settings.log_level, settings.log_format);
            if let Err(e) = policy {
                tracing::warn!(error = %e, "setting the CPU scheduling policy failed");
            }
            let config = settings.into_config()?;
            actix_web::rt::System::new().block_on(sealpost::server::run(config, |addr| {
                // The one line on stdout: tests and scripts read the bound port from it.
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "listening on {addr}");
                let _ = out.flush();
            }))
        }
        Command::PlatformKeygen => {
            use base64::{Engine, engine::general_purpose::STANDARD};
            let key = ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng);
            let mut out = std::io::stdout().lock();
            writeln!(out, "secret_key = {}", STANDARD.encode(key.to_bytes()))?;
            writeln!(
                out,
                "public_key = {}",
                STANDARD.encode(key.verifying_key().to_bytes())
            )?;
            Ok(())
        }
        Command::Keygen { dir } => {
            std::fs::create_dir_all(&dir)?;
            sealpost::crypto::TokenHasher::load_or_create(&dir)?;
            let key = sealpost::federation::identity::ServerKey::load_or_create(&dir)?;
            writeln!(std::io::stdout().lock(), "{}", key.public_b64())?;
            Ok(())
        }
        Command::FederationKey { data_dir } => {
            let key = sealpost::federation::identity::ServerKey::load_or_create(&data_dir)?;
            writeln!(std::io::stdout().lock(), "{}", key.public_b64())?;
            Ok(())
        }
        Command::MintToken {
            secret_key,
            handle,
            ttl_secs,
        } => {
            use base64::{Engine, engine::general_purpose::STANDARD};
            let bytes = zeroize::Zeroizing::new(STANDARD.decode(secret_key.trim())?);
            let arr: [u8; 32] = bytes
                .as_slice()
                .try_into()
                .map_err(|_| anyhow::anyhow!("secret key must be 32 bytes"))?;
            let key = ed25519_dalek::SigningKey::from_bytes(&arr);
            let exp = sealpost::clock::now_ms() / 1000 + ttl_secs;
            let token = sealpost::crypto::mint_registration_token(&key, &handle, exp);
            writeln!(std::io::stdout().lock(), "{token}")?;
            Ok(())
        }
    }
}
