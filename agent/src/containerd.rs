//! containerd over its own gRPC API on its socket — no crictl or ctr. The
//! containerd probe asks Version, then a container list in a namespace
//! (`k8s.io`), which proves the runtime serves requests (a wedged containerd
//! often still accepts connections); the cleanDisk remedy deletes the images
//! no container uses.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use nodekeeper_proto::containerd::containers::ListContainersRequest;
use nodekeeper_proto::containerd::containers::containers_client::ContainersClient;
use nodekeeper_proto::containerd::images::images_client::ImagesClient;
use nodekeeper_proto::containerd::images::{DeleteImageRequest, Image, ListImagesRequest};
use nodekeeper_proto::containerd::version::version_client::VersionClient;
use tonic::transport::{Channel, Endpoint, Uri};

/// The default socket.
pub const SOCKET: &str = "/run/containerd/containerd.sock";

/// What a healthy containerd answered.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub version: String,
    pub containers: usize,
}

/// The namespace when none is given: Kubernetes' (the CRI plugin's).
pub const NAMESPACE: &str = "k8s.io";

/// A channel to containerd at `socket` (empty: [`SOCKET`]), and the path shown in errors.
async fn connect(socket: &str, timeout: Duration) -> Result<(Channel, String), String> {
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
    Ok((channel, shown))
}

/// The namespace `ns` names (empty: [`NAMESPACE`]).
pub fn namespace(ns: &str) -> &str {
    if ns.is_empty() { NAMESPACE } else { ns }
}

/// `msg` addressed to namespace `ns` (empty: [`NAMESPACE`]).
fn in_namespace<T>(ns: &str, msg: T) -> Result<tonic::Request<T>, String> {
    let ns = namespace(ns);
    let mut req = tonic::Request::new(msg);
    req.metadata_mut().insert(
        "containerd-namespace",
        ns.parse().map_err(|_| format!("{ns:?} is not a usable namespace"))?,
    );
    Ok(req)
}

/// Version and a container list, each within `timeout`.
pub async fn ask(socket: &str, namespace: &str, timeout: Duration) -> Result<Answer, String> {
    let (channel, shown) = connect(socket, timeout).await?;
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
    let ns = self::namespace(namespace);
    let req = in_namespace(ns, ListContainersRequest::default())?;
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

/// Image names no container of the namespace uses, as of `now`: an image
/// is in use when a container names it or another name of the same content
/// (its target digest); images pinned by the CRI plugin (the sandbox
/// image, under any of its names) and images changed less than `min_age` ago (pulled for a pod
/// that has not started yet) are kept, as kubelet's image GC keeps them.
pub fn unused_images(
    images: &[Image],
    used_names: &BTreeSet<String>,
    min_age: Duration,
    now: SystemTime,
) -> Vec<String> {
    let digest = |i: &Image| i.target.as_ref().map(|t| t.digest.clone()).unwrap_or_default();
    let pinned = |i: &Image| i.labels.get("io.cri-containerd.pinned").is_some_and(|v| v == "pinned");
    // Content any of whose names is used or pinned is kept under all its names.
    let kept: BTreeSet<String> = images
        .iter()
        .filter(|i| used_names.contains(&i.name) || pinned(i))
        .map(digest)
        .collect();
    images
        .iter()
        .filter(|i| !kept.contains(&digest(i)))
        .filter(|i| {
            let changed = i
                .updated_at
                .as_ref()
                .or(i.created_at.as_ref())
                .map(|t| SystemTime::UNIX_EPOCH + Duration::new(t.seconds.max(0) as u64, t.nanos.max(0) as u32));
            changed.is_some_and(|t| now.duration_since(t).unwrap_or_default() >= min_age)
        })
        .map(|i| i.name.clone())
        .collect()
}

/// What [`remove_unused_images`] did.
#[derive(Debug, Default, PartialEq)]
pub struct Cleaned {
    pub deleted: Vec<String>,
    pub kept: usize,
}

/// Deletes the images of `namespace` no container uses (see
/// [`unused_images`]), each call within `timeout`; containerd frees their
/// content before each delete returns.
pub async fn remove_unused_images(
    socket: &str,
    namespace: &str,
    min_age: Duration,
    timeout: Duration,
) -> Result<Cleaned, String> {
    let (channel, shown) = connect(socket, timeout).await?;
    let late = |what: &str| {
        format!(
            "containerd at {shown} did not answer {what} within {} s",
            timeout.as_secs()
        )
    };
    let containers = tokio::time::timeout(
        timeout,
        ContainersClient::new(channel.clone()).list(in_namespace(namespace, ListContainersRequest::default())?),
    )
    .await
    .map_err(|_| late("a container list"))?
    .map_err(|e| format!("containerd listing containers: {}", e.message()))?
    .into_inner()
    .containers;
    let used: BTreeSet<String> = containers.into_iter().map(|c| c.image).collect();
    let mut client = ImagesClient::new(channel);
    let images = tokio::time::timeout(
        timeout,
        client.list(in_namespace(namespace, ListImagesRequest::default())?),
    )
    .await
    .map_err(|_| late("an image list"))?
    .map_err(|e| format!("containerd listing images: {}", e.message()))?
    .into_inner()
    .images;
    let unused = unused_images(&images, &used, min_age, SystemTime::now());
    let mut out = Cleaned {
        kept: images.len() - unused.len(),
        ..Default::default()
    };
    let mut errors: BTreeMap<String, String> = BTreeMap::new();
    for name in unused {
        let req = in_namespace(
            namespace,
            DeleteImageRequest {
                name: name.clone(),
                sync: true,
            },
        )?;
        match tokio::time::timeout(timeout, client.delete(req)).await {
            Ok(Ok(_)) => out.deleted.push(name),
            // Gone meanwhile: nothing to do.
            Ok(Err(e)) if e.code() == tonic::Code::NotFound => {}
            Ok(Err(e)) => {
                errors.insert(name, e.message().to_string());
            }
            Err(_) => {
                errors.insert(name, late("an image delete"));
            }
        }
    }
    if !errors.is_empty() {
        let list: Vec<String> = errors.iter().map(|(n, e)| format!("{n}: {e}")).collect();
        return Err(format!(
            "deleted {} unused image(s), but not {}",
            out.deleted.len(),
            list.join("; ")
        ));
    }
    Ok(out)
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

#[cfg(test)]
mod tests {
    use super::*;
    use nodekeeper_proto::containerd::images::Descriptor;

    fn image(name: &str, digest: &str, age_s: i64, pinned: bool) -> Image {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs() as i64;
        Image {
            name: name.into(),
            labels: if pinned {
                [("io.cri-containerd.pinned".to_string(), "pinned".to_string())].into()
            } else {
                Default::default()
            },
            target: Some(Descriptor {
                digest: digest.into(),
                ..Default::default()
            }),
            created_at: Some(prost_types::Timestamp {
                seconds: now - age_s,
                nanos: 0,
            }),
            updated_at: None,
        }
    }

    #[test]
    fn unused_images_spare_every_name_of_used_content_pinned_and_young_images() {
        let images = vec![
            image("docker.io/library/app:1", "sha256:a", 3600, false),
            image("docker.io/library/app@sha256:a", "sha256:a", 3600, false),
            image("sha256:a", "sha256:a", 3600, false),
            image("docker.io/library/old:1", "sha256:b", 3600, false),
            image("sha256:b", "sha256:b", 3600, false),
            image("registry.k8s.io/pause:3.9", "sha256:p", 3600, true),
            image("sha256:p", "sha256:p", 3600, false),
            image("docker.io/library/new:1", "sha256:c", 10, false),
        ];
        let used: BTreeSet<String> = ["docker.io/library/app:1".to_string()].into();
        let got = unused_images(&images, &used, Duration::from_secs(120), SystemTime::now());
        assert_eq!(got, vec!["docker.io/library/old:1".to_string(), "sha256:b".to_string()]);
        let none = unused_images(&images, &used, Duration::from_secs(7200), SystemTime::now());
        assert!(none.is_empty(), "{none:?}");
    }
}
