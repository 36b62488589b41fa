//! A small HTTP/1.1 client for the hub's API (TCP) and the agent's socket
//! (Unix), so one code path serves both. One connection is kept alive for
//! the requests of a command (a paged list is many requests). Answers are
//! read into the contract's types (`nodekeeper_proto`), never as untyped
//! JSON, so a renamed field fails to compile instead of printing an empty
//! column.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, bail};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use nodekeeper_proto::api::ApiError;
use nodekeeper_proto::tls;
use rustls::pki_types::ServerName;
use serde::de::DeserializeOwned;

/// Where requests go.
#[derive(Clone)]
pub enum Target {
    /// A hub's operator API.
    Hub(Hub),
    /// Path of an agent socket.
    Unix(std::path::PathBuf),
}

/// A hub: its address, TLS (trusting the hub CA) and bearer token.
#[derive(Clone)]
pub struct Hub {
    hostport: String,
    tls: Option<(Arc<rustls::ClientConfig>, ServerName<'static>)>,
    token: Option<String>,
}

impl Target {
    /// `https://host:port` trusting the CA in `ca` (PEM file), or
    /// `http://host:port` for an insecure hub; `token` is sent as a bearer
    /// token.
    pub fn hub(url: &str, ca: Option<&Path>, token: Option<String>) -> anyhow::Result<Target> {
        let (rest, https) = match (url.strip_prefix("https://"), url.strip_prefix("http://")) {
            (Some(r), _) => (r, true),
            (None, Some(r)) => (r, false),
            _ => bail!("--hub {url}: expected https://host:port"),
        };
        let hostport = rest.trim_end_matches('/');
        if hostport.is_empty() || hostport.contains('/') {
            bail!("--hub {url}: expected https://host:port");
        }
        let hostport = if hostport.rsplit_once(':').is_some_and(|(_, p)| p.parse::<u16>().is_ok()) {
            hostport.to_string()
        } else {
            format!("{hostport}:{}", if https { 443 } else { 80 })
        };
        let tls = if https {
            let ca = ca.ok_or_else(|| {
                anyhow::anyhow!(
                    "--hub {url}: give the hub's CA certificate with --ca, NODEKEEPER_CA or `ca:` in the nkctl config (it is ca.crt in the hub's stateDir)"
                )
            })?;
            let roots = tls::read_certs(ca).map_err(|e| anyhow::anyhow!("--ca: {e}"))?;
            let (config, _) = tls::client_config(tls::Trust::Roots(roots), None, &[b"http/1.1"])?;
            Some((Arc::new(config), tls::server_name_of(url)?))
        } else {
            None
        };
        Ok(Target::Hub(Hub { hostport, tls, token }))
    }

    fn describe(&self) -> String {
        match self {
            Target::Hub(h) => format!(
                "hub at {}://{}",
                if h.tls.is_some() { "https" } else { "http" },
                h.hostport
            ),
            Target::Unix(p) => format!("agent socket {}", p.display()),
        }
    }
}

/// A client for one target, keeping its connection between requests.
pub struct Client {
    target: Target,
    conn: Option<SendRequest<Full<Bytes>>>,
}

impl Client {
    pub fn new(target: Target) -> Client {
        Client { target, conn: None }
    }

    async fn connect(&self) -> anyhow::Result<SendRequest<Full<Bytes>>> {
        match &self.target {
            Target::Hub(h) => {
                let stream = tokio::net::TcpStream::connect(&h.hostport).await.with_context(|| {
                    format!(
                        "cannot reach the {}; is the hub running? (--hub or NODEKEEPER_HUB)",
                        self.target.describe()
                    )
                })?;
                // A request and its answer are several TLS records: without
                // this, Nagle's algorithm holds one back for the peer's
                // delayed ACK.
                stream.set_nodelay(true).ok();
                match &h.tls {
                    Some((config, name)) => {
                        let stream = tokio_rustls::TlsConnector::from(config.clone())
                            .connect(name.clone(), stream)
                            .await
                            .with_context(|| {
                                format!(
                                    "TLS with the {}; is --ca the hub's CA (ca.crt in its stateDir)?",
                                    self.target.describe()
                                )
                            })?;
                        handshake(stream).await
                    }
                    None => handshake(stream).await,
                }
            }
            Target::Unix(p) => {
                let stream = tokio::net::UnixStream::connect(p).await.with_context(|| {
                    format!(
                        "cannot reach the {}; is the agent running, and may you use its socket? (--socket)",
                        self.target.describe()
                    )
                })?;
                handshake(stream).await
            }
        }
    }

    /// Sends one request; the answer's body when it succeeded, its error
    /// (naming the field) when not.
    pub async fn call(&mut self, method: Method, path: &str, body: Option<String>) -> anyhow::Result<Bytes> {
        let (host, token) = match &self.target {
            Target::Hub(h) => (h.hostport.clone(), h.token.clone()),
            Target::Unix(_) => ("localhost".into(), None),
        };
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, host)
            .header(hyper::header::CONTENT_TYPE, "application/yaml");
        if let Some(t) = token {
            req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .context("building request")?;
        let mut sender = match self.conn.take() {
            Some(c) if !c.is_closed() => c,
            _ => self.connect().await?,
        };
        sender.ready().await.ok();
        let resp = sender
            .send_request(req)
            .await
            .with_context(|| format!("talking to the {}", self.target.describe()))?;
        self.conn = Some(sender);
        let status = resp.status();
        let bytes = resp.into_body().collect().await.context("reading response")?.to_bytes();
        check(status, bytes)
    }

    /// GET, read into `T`.
    pub async fn get<T: DeserializeOwned>(&mut self, path: &str) -> anyhow::Result<T> {
        let bytes = self.call(Method::GET, path, None).await?;
        parse(path, &bytes)
    }
}

async fn handshake<S>(stream: S) -> anyhow::Result<SendRequest<Full<Bytes>>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// Reads an answer into `T`, saying which answer and field did not fit
/// (a hub of another version, most likely).
pub fn parse<T: DeserializeOwned>(path: &str, bytes: &[u8]) -> anyhow::Result<T> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        anyhow::anyhow!(
            "the answer to {path} does not fit this nkctl ({}: {}); is the hub of another version?",
            e.path(),
            e.inner()
        )
    })
}

/// Turns an error answer into an error naming the field.
fn check(status: StatusCode, bytes: Bytes) -> anyhow::Result<Bytes> {
    if status.is_success() {
        return Ok(bytes);
    }
    let (msg, field) = match serde_json::from_slice::<ApiError>(&bytes) {
        Ok(e) => (e.error, e.field),
        Err(_) => (format!("{status}: {}", String::from_utf8_lossy(&bytes)), None),
    };
    let hint = match status {
        StatusCode::UNAUTHORIZED => " (give a token: --token, NODEKEEPER_TOKEN or `token:` in the nkctl config)",
        StatusCode::FORBIDDEN => " (ask an admin for a token with that role)",
        _ => "",
    };
    match field {
        Some(f) if !f.is_empty() && !msg.contains(&f) => bail!("{msg} (field {f}){hint}"),
        _ => bail!("{msg}{hint}"),
    }
}
