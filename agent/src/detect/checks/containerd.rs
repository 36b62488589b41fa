//! Asks containerd over its own gRPC API on its socket — no crictl or ctr:
//! Version, then a container list in a namespace (`k8s.io`), which proves
//! the runtime serves requests (a wedged containerd often still accepts
//! connections).

use std::path::PathBuf;
use std::time::Duration;

use nodekeeper_proto::containerd::containers::ListContainersRequest;
use nodekeeper_proto::containerd::containers::containers_client::ContainersClient;
use nodekeeper_proto::containerd::version::version_client::VersionClient;
use tonic::transport::{Endpoint, Uri};

/// The default socket.
pub const SOCKET: &str = "/run/containerd/containerd.sock";

/// What a healthy containerd answered.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub version: String,
    pub containers: usize,
}

/// Version and a container list, each within `timeout`.
pub async fn ask(socket: &str, namespace: &str, timeout: Duration) -> Result<Answer, String> {
    let path = PathBuf::from(if socket.is_empty() { SOCKET } else { socket });
    let shown = path.display().to_string();
    let connector = tower::service_fn(move |_: Uri| {
        let path = path.clone();
        async move {
            let s = tokio::net::UnixStream::connect(&path).await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
        }
    });
    let channel = Endpoint::from_static("http://containerd")
        .connect_timeout(timeout)
        .timeout(timeout)
        .connect_with_connector(connector)
        .await
        .map_err(|e| format!("cannot connect to containerd at {shown}: {}", chain(&e)))?;
    let version = tokio::time::timeout(timeout, VersionClient::new(channel.clone()).version(()))
        .await
        .map_err(|_| {
            format!(
                "containerd at {shown} did not answer Version within {} s",
                timeout.as_secs()
            )
        })?
        .map_err(|e| format!("containerd Version: {}", e.message()))?
        .into_inner()
        .version;
    let ns = if namespace.is_empty() { "k8s.io" } else { namespace };
    let mut req = tonic::Request::new(ListContainersRequest::default());
    req.metadata_mut().insert(
        "containerd-namespace",
        ns.parse().map_err(|_| format!("{ns:?} is not a usable namespace"))?,
    );
    let list = tokio::time::timeout(timeout, ContainersClient::new(channel).list(req))
        .await
        .map_err(|_| {
            format!(
                "containerd {version} at {shown} answers Version but did not list the containers of {ns} within {} s",
                timeout.as_secs()
            )
        })?
        .map_err(|e| format!("containerd listing containers of {ns}: {}", e.message()))?
        .into_inner();
    Ok(Answer {
        version,
        containers: list.containers.len(),
    })
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}
