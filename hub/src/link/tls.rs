//! TLS on the hub's listeners. Handshakes run in their own tasks, each
//! within a deadline, so a slow or silent client never holds up accepting
//! the next one; completed connections are handed on through a channel. A
//! failed handshake (a plaintext client, an unknown CA, an expired
//! certificate) is counted and audited.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::{Stream, StreamExt};
use nodekeeper_proto::tls::cert_facts;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
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

macro_rules! delegate_io {
    ($t:ty, $field:ident) => {
        impl AsyncRead for $t {
            fn poll_read(
                mut self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &mut ReadBuf<'_>,
            ) -> Poll<io::Result<()>> {
                Pin::new(&mut self.$field).poll_read(cx, buf)
            }
        }
        impl AsyncWrite for $t {
            fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
                Pin::new(&mut self.$field).poll_write(cx, buf)
            }
            fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                Pin::new(&mut self.$field).poll_flush(cx)
            }
            fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                Pin::new(&mut self.$field).poll_shutdown(cx)
            }
            fn poll_write_vectored(
                mut self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                bufs: &[io::IoSlice<'_>],
            ) -> Poll<io::Result<usize>> {
                Pin::new(&mut self.$field).poll_write_vectored(cx, bufs)
            }
            fn is_write_vectored(&self) -> bool {
                self.$field.is_write_vectored()
            }
        }
    };
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
                let remote = info.remote;
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(conn)).await {
                    Ok(Ok(stream)) => {
                        info.peer = stream
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|c| c.first())
                            .and_then(|c| cert_facts(c).ok())
                            .map(Arc::new);
                        let _ = tx.send(Ok(TlsConn { stream, info })).await;
                    }
                    Ok(Err(e)) => handshake_failed(&auth, remote, "listen.grpc", &e.to_string()),
                    Err(_) => handshake_failed(&auth, remote, "listen.grpc", "no handshake within 10 s"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

fn handshake_failed(auth: &Auth, remote: Option<SocketAddr>, listener: &str, why: &str) {
    auth.record_handshake_failure(remote, listener, why);
    tracing::debug!(?remote, listener, error = why, "TLS handshake failed");
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
                let (acceptor, tx, auth) = (acceptor.clone(), tx.clone(), auth.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            let _ = tx.send((stream, remote)).await;
                        }
                        Ok(Err(e)) => handshake_failed(&auth, Some(remote), "listen.http", &e.to_string()),
                        Err(_) => handshake_failed(&auth, Some(remote), "listen.http", "no handshake within 10 s"),
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
