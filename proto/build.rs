//! Compiles the .proto contract with protox (pure Rust, no system protoc) and
//! derives the YAML/JSON form of every resource message from the same types.

const RESOURCE_MESSAGES: &[&str] = &[
    "ObjectMeta",
    "LabelSelector",
    "LabelSelectorRequirement",
    "Condition",
    "Event",
    "NodeFacts",
    "Node",
    "NodeSpec",
    "NodeStatus",
    "NodeSet",
    "NodeSetSpec",
    "NodeSetStatus",
    "AgentProfile",
    "AgentProfileSpec",
    "AgentProfileStatus",
    "AgentSettings",
    "DetectorSet",
    "DetectorSetSpec",
    "DetectorSetStatus",
    "LogMonitor",
    "LogPluginConfig",
    "LogCondition",
    "LogRule",
    "CustomPluginMonitor",
    "Probe",
    "HttpProbe",
    "TcpProbe",
    "ExecProbe",
    "SystemdUnitProbe",
    "ContainerdProbe",
    "ResourceChecks",
    "Threshold",
    "SignalTiming",
    "MemoryCheck",
    "DiskCheck",
    "PidCheck",
    "PsiCheck",
    "LoadCheck",
    "HardwareChecks",
    "EdacCheck",
    "NicCheck",
    "ClockCheck",
    "ReadOnlyCheck",
    "TaintCheck",
    "StuckTaskCheck",
    "SmartCheck",
    "GpuCheck",
    "Component",
    "ComponentSpec",
    "NodeSetParams",
    "Artifact",
    "PackageArtifact",
    "ArchiveArtifact",
    "FileArtifact",
    "ManagedFile",
    "ServiceSpec",
    "HealthCheck",
    "UpdateStrategy",
    "RollingUpdate",
    "Canary",
    "TimeWindow",
    "RolloutStatus",
    "NodeSetRollout",
    "Permit",
    "DisruptionBudget",
    "DisruptionBudgetSpec",
    "DisruptionBudgetStatus",
    "ComponentStatus",
    "DesiredComponent",
    "NodeComponent",
    "RemedyRule",
    "RemedyRuleSpec",
    "RemedyTrigger",
    "RemedyStep",
    "RemedyBreaker",
    "RemedyRuleStatus",
    "RemedyJob",
    "RemedyStepRecord",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/nodekeeper/v1/resources.proto", "proto/nodekeeper/v1/link.proto"];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    let mut builder = tonic_prost_build::configure()
        .btree_map(".")
        .codec_path("crate::codec::LinkCodec")
        // The large variants of the link's messages are boxed, so the small
        // ones (heartbeats, acknowledgements) that every session queues are
        // not the size of a Hello or a whole desired state.
        .boxed(".nodekeeper.v1.AgentMessage.body.hello")
        .boxed(".nodekeeper.v1.HubMessage.body.desired");
    for m in RESOURCE_MESSAGES {
        builder = builder.message_attribute(
            format!(".nodekeeper.v1.{m}"),
            "#[derive(serde::Serialize, serde::Deserialize)]\n\
             #[serde(rename_all = \"camelCase\", default, deny_unknown_fields)]",
        );
    }
    // NPD writes these with snake_case keys.
    for m in ["CustomPluginConfig", "CustomPluginRule"] {
        builder = builder.message_attribute(
            format!(".nodekeeper.v1.{m}"),
            "#[derive(serde::Serialize, serde::Deserialize)]\n\
             #[serde(rename_all = \"snake_case\", default, deny_unknown_fields)]",
        );
    }
    // Counts or percents accept YAML integers as well as strings.
    for f in [
        "RollingUpdate.max_unavailable",
        "RollingUpdate.partition",
        "RollingUpdate.failure_threshold",
        "Canary.nodes",
        "DisruptionBudgetSpec.max_unavailable",
        "RemedyRuleSpec.max_concurrent",
        "RemedyBreaker.threshold",
    ] {
        builder = builder.field_attribute(
            format!(".nodekeeper.v1.{f}"),
            "#[serde(deserialize_with = \"crate::count::deserialize\")]",
        );
    }
    // Thresholds accept YAML numbers as well as strings.
    for f in ["Threshold.enter", "Threshold.exit"] {
        builder = builder.field_attribute(
            format!(".nodekeeper.v1.{f}"),
            "#[serde(deserialize_with = \"crate::quantity::deserialize\")]",
        );
    }
    builder.compile_fds(fds)?;
    // containerd's API, client side only, for the containerd probe and the
    // cleanDisk remedy.
    let containerd = [
        "proto/containerd/api.proto",
        "proto/containerd/containers.proto",
        "proto/containerd/images.proto",
    ];
    for f in containerd {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(containerd, ["proto"])?;
    tonic_prost_build::configure().build_server(false).compile_fds(fds)?;
    Ok(())
}
