//! `client`: acts as a Talos node against any KMS endpoint, for troubleshooting.

use anyhow::Context;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use talos_kms_server::client::{
    ClientOptions, Endpoint, KeyExchange, KmsClient, random_passphrase, random_uuid,
};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    target: Target,
    #[command(subcommand)]
    action: Action,
}

/// Which endpoint to talk to, and how: shared by `client` and `bench`. Global, so that they
/// may come before or after `client`'s command.
#[derive(clap::Args)]
pub struct Target {
    /// KMS endpoint as in the Talos machine config: https://host:port, or grpc://host:port.
    /// Required.
    // Optional to clap: a global argument cannot be required.
    #[arg(long, value_name = "URL", global = true)]
    endpoint: Option<Endpoint>,
    /// PEM CA certificate(s) to trust instead of the public roots Talos ships.
    #[arg(long, value_name = "FILE", global = true)]
    ca: Option<PathBuf>,
    /// Source address to connect from, to act as the node with that address.
    #[arg(long, value_name = "IP", global = true)]
    source_ip: Option<IpAddr>,
    /// TLS key-exchange groups to offer, as a Talos release does.
    #[arg(long, value_name = "GROUPS", value_enum, default_value_t = KeyExchange::Go124, global = true)]
    kx: KeyExchange,
    /// Begin each connection with a PROXY protocol v2 header carrying its own source
    /// address, as a load balancer would: for a server whose trustedProxies holds this
    /// client's address.
    #[arg(long, global = true)]
    proxy_v2: bool,
}

impl Target {
    pub fn client(self) -> anyhow::Result<KmsClient> {
        let endpoint = self.endpoint.context(
            "--endpoint URL is required: the KMS endpoint as in the Talos machine config, \
             e.g. https://kms.example.com:50051",
        )?;
        let mut options = ClientOptions::new(endpoint);
        options.ca_file = self.ca;
        options.source_ip = self.source_ip;
        options.key_exchange = self.kx;
        options.proxy_v2 = self
            .proxy_v2
            .then_some(talos_kms_server::client::ProxyV2::OwnAddress);
        Ok(KmsClient::new(options)?)
    }
}

#[derive(clap::Subcommand)]
enum Action {
    /// Seal a passphrase (random 32 bytes unless given) and print the sealed blob.
    Seal {
        /// Node UUID to seal for, as a Talos node sends its SMBIOS UUID.
        #[arg(long, value_name = "UUID")]
        node_uuid: String,
        /// Passphrase to seal, base64.
        #[arg(long, value_name = "BASE64")]
        passphrase: Option<String>,
        /// What to print: both values labelled, only the sealed blob (base64, for `unseal
        /// --sealed`), or one JSON object {"node_uuid","sealed","passphrase"} (base64).
        #[arg(long, value_enum, default_value_t = SealOutput::Text)]
        output: SealOutput,
    },
    /// Unseal a blob and print the LUKS2 passphrase (base64 of the unsealed bytes).
    Unseal {
        /// Node UUID the blob was sealed for.
        #[arg(long, value_name = "UUID")]
        node_uuid: String,
        /// Sealed blob, base64 (the `sealedData` of the node's sideroKMS LUKS2 token).
        #[arg(long, value_name = "BASE64")]
        sealed: String,
    },
    /// Seal a random passphrase, unseal it, and check that it comes back. Each run is a real
    /// seal: it adds a record to the server's database (under a random node UUID unless
    /// given); `keys purge --not-accessed-for` removes such records later.
    Roundtrip {
        /// Node UUID to use; a random one by default.
        #[arg(long, value_name = "UUID")]
        node_uuid: Option<String>,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum SealOutput {
    /// `sealed:` and `passphrase:` lines.
    Text,
    /// The sealed blob alone, base64.
    Raw,
    /// {"node_uuid","sealed","passphrase"}, base64: a line of a `bench --volumes-from` file.
    Json,
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let client = args.target.client()?;
    match args.action {
        Action::Seal {
            node_uuid,
            passphrase,
            output,
        } => {
            if !looks_like_uuid(&node_uuid) {
                eprintln!(
                    "warning: --node-uuid {node_uuid:?} is not a UUID; a Talos node always sends \
                     its SMBIOS UUID (e.g. 213faf71-17a0-43d7-a88b-0afd96094178), so no node \
                     will ever unseal this record; sealing anyway"
                );
            }
            let passphrase = match passphrase {
                Some(text) => BASE64
                    .decode(text.trim())
                    .context("--passphrase is not base64")?,
                None => random_passphrase().to_vec(),
            };
            let sealed = client.seal(&node_uuid, &passphrase).await?;
            let (sealed, passphrase) = (BASE64.encode(&sealed), BASE64.encode(&passphrase));
            match output {
                SealOutput::Text => {
                    println!("sealed:     {sealed}");
                    println!("passphrase: {passphrase}");
                }
                SealOutput::Raw => println!("{sealed}"),
                SealOutput::Json => println!(
                    "{}",
                    serde_json::json!({
                        "node_uuid": node_uuid,
                        "sealed": sealed,
                        "passphrase": passphrase,
                    })
                ),
            }
        }
        Action::Unseal { node_uuid, sealed } => {
            let sealed = BASE64
                .decode(sealed.trim())
                .context("--sealed is not base64")?;
            let passphrase = client.unseal(&node_uuid, &sealed).await?;
            // The server answers a wrong key with random bytes: only LUKS2 can tell.
            println!("{}", BASE64.encode(passphrase));
        }
        Action::Roundtrip { node_uuid } => {
            let node_uuid = node_uuid.unwrap_or_else(random_uuid);
            let passphrase = random_passphrase();
            let sealed = client.seal(&node_uuid, &passphrase).await?;
            let unsealed = client.unseal(&node_uuid, &sealed).await?;
            if unsealed != passphrase {
                println!("FAILED: unseal returned other bytes than were sealed (node {node_uuid})");
                return Ok(ExitCode::FAILURE);
            }
            println!(
                "ok: sealed a 32-byte passphrase for node {node_uuid} into {} bytes and unsealed it on a new connection",
                sealed.len()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// 8-4-4-4-12 hex digits, as an SMBIOS UUID is written (any version, any case).
fn looks_like_uuid(text: &str) -> bool {
    let groups: Vec<&str> = text.split('-').collect();
    groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12])
        && groups
            .iter()
            .all(|g| g.bytes().all(|b| b.is_ascii_hexdigit()))
}
