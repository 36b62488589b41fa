//! A small HTTP/1.1 client for the hub's API (TCP) and the agent's socket
//! (Unix), so one code path serves both.

use anyhow::{Context, bail};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;

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

/// A JSON response.
pub struct Response {
    pub status: StatusCode,
    pub body: Value,
}

/// Sends one request and reads the JSON answer.
pub async fn call(target: &Target, method: Method, path: &str, body: Option<String>) -> anyhow::Result<Response> {
    let host = match target {
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
    let resp = match target {
        Target::Tcp(h) => {
            let stream = tokio::net::TcpStream::connect(h).await.with_context(|| {
                format!(
                    "cannot reach the {}; is the hub running? (--hub or NODEKEEPER_HUB)",
                    target.describe()
                )
            })?;
            send(stream, req).await
        }
        Target::Unix(p) => {
            let stream = tokio::net::UnixStream::connect(p).await.with_context(|| {
                format!(
                    "cannot reach the {}; is the agent running, and may you use its socket? (--socket)",
                    target.describe()
                )
            })?;
            send(stream, req).await
        }
    }
    .with_context(|| format!("talking to the {}", target.describe()))?;
    let status = resp.status();
    let bytes = resp.into_body().collect().await.context("reading response")?.to_bytes();
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
    };
    Ok(Response { status, body })
}

async fn send<S>(stream: S, req: Request<Full<Bytes>>) -> anyhow::Result<hyper::Response<hyper::body::Incoming>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender.send_request(req).await?)
}

/// Turns an error response into an error naming the field.
pub fn check(resp: Response) -> anyhow::Result<Value> {
    if resp.status.is_success() {
        return Ok(resp.body);
    }
    let msg = resp
        .body
        .get("error")
        .and_then(Value::as_str)
        .map(String::from)
        .unwrap_or_else(|| resp.body.to_string());
    match resp.body.get("field").and_then(Value::as_str) {
        Some(f) if !f.is_empty() && !msg.contains(f) => bail!("{msg} (field {f})"),
        _ => bail!("{msg}"),
    }
}
