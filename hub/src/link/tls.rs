//! TLS on the hub's listeners. Handshakes run in their own tasks, each
//! within a deadline, so a slow or silent client never holds up accepting
//! the next one; completed connections are handed on through a channel. A
//! failed handshake (a plaintext client, an unknown CA, an expired
//! certificate) is counted and audited.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use nodekeeper_proto::tls::cert_facts;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

use super::admission::{Conn, ConnInfo};
use crate::auth::Auth;

/// How long a client has to complete its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Completed handshakes waiting for the server to take them.
const READY_QUEUE: usize = 1024;

/// An agent connection after its TLS handshake.
pub struct TlsConn {
    stream: TlsStream<Conn>,
    info: ConnInfo,
}

impl Connected for TlsConn {
    type ConnectInfo = ConnInfo;
    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

delegate_io!(TlsConn, stream);

/// Wraps the admitted agent connections in TLS.
pub fn agent_incoming(
    plain: impl Stream<Item = Result<Conn, io::Error>> + Send + 'static,
    acceptor: TlsAcceptor,
    auth: Arc<Auth>,
) -> impl Stream<Item = Result<TlsConn, io::Error>> {
    let (tx, rx) = mpsc::channel::<Result<TlsConn, io::Error>>(READY_QUEUE);
    tokio::spawn(async move {
        let mut plain = Box::pin(plain);
        while let Some(next) = plain.next().await {
            let Ok(conn) = next else { continue };
            let (acceptor, tx, auth) = (acceptor.clone(), tx.clone(), auth.clone());
            tokio::spawn(async move {
                let mut info = conn.info().clone();
                let Some(stream) = handshake(&acceptor, conn, info.remote, "listen.grpc", &auth).await else {
                    return;
                };
                info.peer = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(|c| cert_facts(c).ok())
                    .map(Arc::new);
                let _ = tx.send(Ok(TlsConn { stream, info })).await;
            });
        }
    });
    ReceiverStream::new(rx)
}

/// The server side of one handshake within its deadline; a failure is
/// audited (once per source and listener a minute) and `None`.
async fn handshake<IO>(
    acceptor: &TlsAcceptor,
    io: IO,
    remote: Option<SocketAddr>,
    listener: &str,
    auth: &Auth,
) -> Option<TlsStream<IO>>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let why = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(io)).await {
        Ok(Ok(stream)) => return Some(stream),
        Ok(Err(e)) => e.to_string(),
        Err(_) => format!("no handshake within {} s", HANDSHAKE_TIMEOUT.as_secs()),
    };
    auth.record_handshake_failure(remote, listener, &why);
    tracing::debug!(?remote, listener, error = %why, "TLS handshake failed");
    None
}

/// The operator API's listener: TLS connections for axum.
pub struct HttpsListener {
    rx: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl HttpsListener {
    pub fn new(listener: TcpListener, acceptor: TlsAcceptor, auth: Arc<Auth>) -> io::Result<HttpsListener> {
        let local = listener.local_addr()?;
        let (tx, rx) = mpsc::channel(READY_QUEUE);
        tokio::spawn(async move {
            let mut pause = Duration::from_millis(10);
            loop {
                let (tcp, remote) = match listener.accept().await {
                    Ok(x) => x,
                    Err(e) => {
                        // Out of descriptors: wait rather than spin.
                        tracing::debug!(error = %e, "API accept error");
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_secs(1));
                        continue;
                    }
                };
                pause = Duration::from_millis(10);
                // TLS writes a response as several records: without
                // TCP_NODELAY, Nagle's algorithm and the client's delayed ACK
                // stall the last one by ~40 ms.
                let _ = tcp.set_nodelay(true);
                let (acceptor, tx, auth) = (acceptor.clone(), tx.clone(), auth.clone());
                tokio::spawn(async move {
                    if let Some(stream) = handshake(&acceptor, tcp, Some(remote), "listen.http", &auth).await {
                        let _ = tx.send((stream, remote)).await;
                    }
                });
            }
        });
        Ok(HttpsListener { rx, local })
    }
}

impl axum::serve::Listener for HttpsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(x) => x,
            // The accept task never ends while the listener lives.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }
}
