//! A small HTTP/1.1 client for the hub's API (TCP) and the agent's socket
//! (Unix), so one code path serves both. One connection is kept alive for
//! the requests of a command (a paged list is many requests). Answers are
//! read into the contract's types (`nodekeeper_proto`), never as untyped
//! JSON, so a renamed field fails to compile instead of printing an empty
//! column.

use anyhow::{Context, bail};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use nodekeeper_proto::api::ApiError;
use serde::de::DeserializeOwned;

/// Where requests go.
#[derive(Debug, Clone)]
pub enum Target {
    /// `host:port` of a hub.
    Tcp(String),
    /// Path of an agent socket.
    Unix(std::path::PathBuf),
}

impl Target {
    /// Parses `http://host:port`.
    pub fn hub(url: &str) -> anyhow::Result<Target> {
        let Some(rest) = url.strip_prefix("http://") else {
            if url.starts_with("https://") {
                bail!("--hub {url}: https is not supported by this nkctl yet; use http://");
            }
            bail!("--hub {url}: expected http://host:port");
        };
        let hostport = rest.trim_end_matches('/');
        if hostport.is_empty() || hostport.contains('/') {
            bail!("--hub {url}: expected http://host:port");
        }
        let hostport = if hostport.contains(':') {
            hostport.to_string()
        } else {
            format!("{hostport}:80")
        };
        Ok(Target::Tcp(hostport))
    }

    fn describe(&self) -> String {
        match self {
            Target::Tcp(h) => format!("hub at http://{h}"),
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
            Target::Tcp(h) => {
                let stream = tokio::net::TcpStream::connect(h).await.with_context(|| {
                    format!(
                        "cannot reach the {}; is the hub running? (--hub or NODEKEEPER_HUB)",
                        self.target.describe()
                    )
                })?;
                handshake(stream).await
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
        let host = match &self.target {
            Target::Tcp(h) => h.clone(),
            Target::Unix(_) => "localhost".into(),
        };
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, host)
            .header(hyper::header::CONTENT_TYPE, "application/yaml")
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
    match field {
        Some(f) if !f.is_empty() && !msg.contains(&f) => bail!("{msg} (field {f})"),
        _ => bail!("{msg}"),
    }
}
