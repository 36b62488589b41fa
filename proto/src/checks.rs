//! Detectors beyond logs — node-problem-detector's custom-plugin monitors,
//! probes, resource pressure and hardware checks — checked with field paths
//! (one definition for a DetectorSet, the agent's local `detectors:` and
//! NPD's JSON files), and their defaults in one place.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::quantity::Quantity;
use crate::resource::{ResourceError, typed};
use crate::v1::{
    CustomPluginMonitor, CustomPluginRule, HardwareChecks, Probe, ResourceChecks, SignalTiming, Threshold,
};

/// NPD's custom-plugin defaults (pkg/custompluginmonitor/types/config.go).
pub const PLUGIN_INVOKE_INTERVAL: Duration = Duration::from_secs(30);
pub const PLUGIN_TIMEOUT: Duration = Duration::from_secs(5);
pub const PLUGIN_MAX_OUTPUT: usize = 80;
pub const PLUGIN_CONCURRENCY: usize = 3;

fn duration(field: &str, s: &str) -> Result<Duration, ResourceError> {
    humantime::parse_duration(s.trim())
        .map_err(|e| ResourceError::new(field, format!("{s:?} is not a duration like 30s or 5m: {e}")))
}

/// Reads NPD's Go durations; "1m30s" and "500ms" parse with humantime too.
fn go_duration(s: &Option<String>, default: Duration) -> Duration {
    s.as_deref()
        .and_then(|s| humantime::parse_duration(s.trim()).ok())
        .unwrap_or(default)
}

impl CustomPluginMonitor {
    /// The global invoke interval.
    pub fn invoke_interval(&self) -> Duration {
        go_duration(
            &self.plugin_config.as_ref().and_then(|c| c.invoke_interval.clone()),
            PLUGIN_INVOKE_INTERVAL,
        )
    }

    /// The global timeout.
    pub fn timeout(&self) -> Duration {
        go_duration(
            &self.plugin_config.as_ref().and_then(|c| c.timeout.clone()),
            PLUGIN_TIMEOUT,
        )
    }

    /// A rule's interval (its own, else the global one).
    pub fn rule_interval(&self, r: &CustomPluginRule) -> Duration {
        go_duration(&r.invoke_interval, self.invoke_interval())
    }

    /// A rule's timeout: its own when shorter than the global one (NPD).
    pub fn rule_timeout(&self, r: &CustomPluginRule) -> Duration {
        let global = self.timeout();
        go_duration(&r.timeout, global).min(global)
    }

    pub fn max_output_length(&self) -> usize {
        self.plugin_config
            .as_ref()
            .and_then(|c| c.max_output_length)
            .map_or(PLUGIN_MAX_OUTPUT, |n| n.max(0) as usize)
    }

    pub fn concurrency(&self) -> usize {
        self.plugin_config
            .as_ref()
            .and_then(|c| c.concurrency)
            .map_or(PLUGIN_CONCURRENCY, |n| n.max(1) as usize)
    }

    pub fn message_change_updates(&self) -> bool {
        self.plugin_config
            .as_ref()
            .and_then(|c| c.enable_message_change_based_condition_update)
            .unwrap_or(false)
    }

    pub fn skip_initial_status(&self) -> bool {
        self.plugin_config
            .as_ref()
            .and_then(|c| c.skip_initial_status)
            .unwrap_or(false)
    }
}

impl CustomPluginRule {
    pub fn is_permanent(&self) -> bool {
        self.r#type == "permanent"
    }
}

/// Parses an NPD custom-plugin file (JSON, or the same in YAML) and checks
/// it. The programs it names are not looked for here: a missing one is
/// reported when it should run (Unknown, with the reason), so a file can be
/// installed before its plugins.
pub fn parse_custom_plugin(text: &str) -> Result<CustomPluginMonitor, ResourceError> {
    let value = crate::rules::npd_file(text, &["custom"], "\"custom\"", "a custom-plugin monitor file")?;
    let m: CustomPluginMonitor = typed(value)?;
    check_custom_plugin(&m)?;
    Ok(m)
}

/// Checks a custom-plugin monitor as NPD's Validate does, and a little more
/// (rule types, empty paths); field names are relative to it.
pub fn check_custom_plugin(m: &CustomPluginMonitor) -> Result<(), ResourceError> {
    if m.plugin != "custom" {
        return Err(ResourceError::new(
            "plugin",
            format!("{:?}: must be \"custom\"", m.plugin),
        ));
    }
    let mut global_timeout = PLUGIN_TIMEOUT;
    if let Some(c) = &m.plugin_config {
        if let Some(s) = &c.invoke_interval
            && duration("pluginConfig.invoke_interval", s)?.is_zero()
        {
            return Err(ResourceError::new(
                "pluginConfig.invoke_interval",
                "must be greater than zero",
            ));
        }
        if let Some(s) = &c.timeout {
            global_timeout = duration("pluginConfig.timeout", s)?;
        }
        if c.max_output_length.is_some_and(|n| n < 0) {
            return Err(ResourceError::new(
                "pluginConfig.max_output_length",
                "must not be negative",
            ));
        }
        if c.concurrency.is_some_and(|n| n < 1) {
            return Err(ResourceError::new("pluginConfig.concurrency", "must be at least 1"));
        }
    }
    for (i, c) in m.conditions.iter().enumerate() {
        if c.r#type.is_empty() {
            return Err(ResourceError::new(format!("conditions[{i}].type"), "missing"));
        }
    }
    for (i, r) in m.rules.iter().enumerate() {
        let at = |f: &str| format!("rules[{i}].{f}");
        if !matches!(r.r#type.as_str(), "temporary" | "permanent") {
            return Err(ResourceError::new(
                at("type"),
                format!("{:?}: temporary or permanent", r.r#type),
            ));
        }
        if r.path.is_empty() {
            return Err(ResourceError::new(at("path"), "missing: the program to run"));
        }
        if let Some(s) = &r.invoke_interval
            && duration(&at("invoke_interval"), s)?.is_zero()
        {
            return Err(ResourceError::new(at("invoke_interval"), "must be greater than zero"));
        }
        if let Some(s) = &r.timeout
            && duration(&at("timeout"), s)? > global_timeout
        {
            return Err(ResourceError::new(
                at("timeout"),
                format!(
                    "{s} is longer than the global timeout {}",
                    humantime::format_duration(global_timeout)
                ),
            ));
        }
        if r.is_permanent() && !m.conditions.iter().any(|c| c.r#type == r.condition) {
            return Err(ResourceError::new(
                at("condition"),
                format!(
                    "{:?} has no default in `conditions`; a permanent rule must name a declared condition",
                    r.condition
                ),
            ));
        }
    }
    Ok(())
}

/// What a probe asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeKind {
    Http,
    Tcp,
    Exec,
    SystemdUnit,
    Containerd,
}

/// `kubelet.service` → `Kubelet`, `my-app` → `MyApp`.
pub fn camel(name: &str) -> String {
    let base = name.strip_suffix(".service").unwrap_or(name);
    base.split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(|w| {
            let mut c = w.chars();
            c.next()
                .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                .unwrap_or_default()
        })
        .collect()
}

impl Probe {
    pub fn kind(&self) -> Option<ProbeKind> {
        let kinds = [
            (self.http.is_some(), ProbeKind::Http),
            (self.tcp.is_some(), ProbeKind::Tcp),
            (self.exec.is_some(), ProbeKind::Exec),
            (self.systemd_unit.is_some(), ProbeKind::SystemdUnit),
            (self.containerd.is_some(), ProbeKind::Containerd),
        ];
        let mut set = kinds.iter().filter(|(on, _)| *on).map(|(_, k)| *k);
        match (set.next(), set.next()) {
            (Some(k), None) => Some(k),
            _ => None,
        }
    }

    /// The health condition, if this probe sets one.
    pub fn condition_type(&self) -> Option<String> {
        if !self.condition.is_empty() {
            return Some(self.condition.clone());
        }
        (self.kind() != Some(ProbeKind::SystemdUnit)).then(|| format!("{}Unhealthy", camel(&self.name)))
    }

    /// The reason while the condition is True.
    pub fn unhealthy_reason(&self) -> String {
        if self.reason.is_empty() {
            self.condition_type().unwrap_or_default()
        } else {
            self.reason.clone()
        }
    }

    pub fn period(&self) -> Duration {
        Duration::from_secs(u64::from(if self.period_seconds == 0 {
            10
        } else {
            self.period_seconds
        }))
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_secs(u64::from(if self.timeout_seconds == 0 {
            5
        } else {
            self.timeout_seconds
        }))
    }

    pub fn failure_threshold(&self) -> u32 {
        if self.failure_threshold == 0 {
            3
        } else {
            self.failure_threshold
        }
    }

    pub fn success_threshold(&self) -> u32 {
        self.success_threshold.max(1)
    }

    /// The restart condition of a systemdUnit probe.
    pub fn restart_condition(&self) -> Option<String> {
        let u = self.systemd_unit.as_ref()?;
        Some(if u.restart_condition.is_empty() {
            format!("Frequent{}Restart", camel(&u.unit))
        } else {
            u.restart_condition.clone()
        })
    }
}

/// Checks a list of probes (names unique, one kind each, addresses usable).
pub fn check_probes(field: &str, probes: &[Probe]) -> Result<(), ResourceError> {
    let mut names = BTreeSet::new();
    for (i, p) in probes.iter().enumerate() {
        let at = |f: &str| format!("{field}[{i}].{f}");
        crate::validate::dns_subdomain(&at("name"), &p.name)?;
        if !names.insert(p.name.as_str()) {
            return Err(ResourceError::new(
                at("name"),
                format!("{:?} is used by an earlier probe", p.name),
            ));
        }
        let kind = p.kind().ok_or_else(|| {
            ResourceError::new(
                format!("{field}[{i}]"),
                "needs exactly one of http, tcp, exec, systemdUnit, containerd",
            )
        })?;
        if p.timeout() > p.period() {
            return Err(ResourceError::new(
                at("timeoutSeconds"),
                "must not be longer than periodSeconds",
            ));
        }
        match kind {
            ProbeKind::Http => {
                let url = &p.http.as_ref().map(|h| h.url.clone()).unwrap_or_default();
                if !(url.starts_with("http://") || url.starts_with("https://")) || url.len() < 10 {
                    return Err(ResourceError::new(
                        at("http.url"),
                        format!("{url:?} is not an http:// or https:// URL"),
                    ));
                }
                if let Some(h) = &p.http
                    && let Some(s) = h.expect_status.iter().find(|s| !(100..600).contains(*s))
                {
                    return Err(ResourceError::new(
                        at("http.expectStatus"),
                        format!("{s} is not an HTTP status"),
                    ));
                }
            }
            ProbeKind::Tcp => {
                let a = p.tcp.as_ref().map(|t| t.address.as_str()).unwrap_or_default();
                let port_ok = a
                    .rsplit_once(':')
                    .is_some_and(|(h, port)| !h.is_empty() && port.parse::<u16>().is_ok());
                if !port_ok {
                    return Err(ResourceError::new(at("tcp.address"), format!("{a:?} is not host:port")));
                }
            }
            ProbeKind::Exec => {
                if p.exec
                    .as_ref()
                    .is_none_or(|e| e.command.first().is_none_or(|c| c.is_empty()))
                {
                    return Err(ResourceError::new(
                        at("exec.command"),
                        "missing: the program and its arguments",
                    ));
                }
            }
            ProbeKind::SystemdUnit => {
                let u = p.systemd_unit.as_ref().map(|u| u.unit.as_str()).unwrap_or_default();
                if u.is_empty() || u.contains('/') || u.contains(char::is_whitespace) {
                    return Err(ResourceError::new(
                        at("systemdUnit.unit"),
                        format!("{u:?} is not a unit name"),
                    ));
                }
            }
            ProbeKind::Containerd => {}
        }
    }
    Ok(())
}

fn check_threshold(field: &str, t: &Option<Threshold>, percent_only: bool) -> Result<(), ResourceError> {
    let Some(t) = t else { return Ok(()) };
    for (v, f) in [(&t.enter, "enter"), (&t.exit, "exit")] {
        if v.is_empty() {
            if f == "enter" {
                return Err(ResourceError::new(format!("{field}.enter"), "missing"));
            }
            continue;
        }
        let q = Quantity::parse(v).map_err(|e| ResourceError::new(format!("{field}.{f}"), e))?;
        if percent_only
            && let Quantity::Amount(a) = q
            && a > 100.0
        {
            return Err(ResourceError::new(
                format!("{field}.{f}"),
                format!("{v:?}: a share of time stalled is at most 100"),
            ));
        }
    }
    Ok(())
}

/// Checks resource thresholds.
pub fn check_resources(field: &str, r: &ResourceChecks) -> Result<(), ResourceError> {
    if let Some(m) = &r.memory {
        check_threshold(&format!("{field}.memory.available"), &m.available, false)?;
        check_threshold(&format!("{field}.memory.psiFullAvg10"), &m.psi_full_avg10, true)?;
    }
    if let Some(d) = &r.disk {
        for (i, m) in d.mounts.iter().enumerate() {
            if !m.starts_with('/') {
                return Err(ResourceError::new(
                    format!("{field}.disk.mounts[{i}]"),
                    format!("{m:?} is not an absolute path"),
                ));
            }
        }
        check_threshold(&format!("{field}.disk.available"), &d.available, false)?;
        check_threshold(&format!("{field}.disk.inodesFree"), &d.inodes_free, false)?;
    }
    if let Some(p) = &r.pids {
        check_threshold(&format!("{field}.pids.available"), &p.available, false)?;
    }
    for (c, name) in [(&r.cpu, "cpu"), (&r.io, "io")] {
        if let Some(c) = c {
            check_threshold(&format!("{field}.{name}.avg10"), &c.avg10, true)?;
        }
    }
    if let Some(l) = &r.load {
        check_threshold(&format!("{field}.load.perCpu"), &l.per_cpu, false)?;
    }
    Ok(())
}

/// The taint flags the kernel prints, in bit order (kernel/panic.c).
pub const TAINT_FLAGS: &str = "PFSRMBUDAWCIOELKXTN";

/// Checks hardware checks.
pub fn check_hardware(field: &str, h: &HardwareChecks) -> Result<(), ResourceError> {
    if !h.root.is_empty() && !h.root.starts_with('/') {
        return Err(ResourceError::new(
            format!("{field}.root"),
            format!("{:?} is not an absolute path", h.root),
        ));
    }
    if let Some(t) = &h.taint
        && let Some(c) = t.flags.chars().find(|c| !TAINT_FLAGS.contains(*c))
    {
        return Err(ResourceError::new(
            format!("{field}.taint.flags"),
            format!("{c:?} is not a kernel taint flag ({TAINT_FLAGS})"),
        ));
    }
    if let Some(r) = &h.read_only
        && let Some(m) = r.mounts.iter().find(|m| !m.starts_with('/'))
    {
        return Err(ResourceError::new(
            format!("{field}.readOnly.mounts"),
            format!("{m:?} is not an absolute path"),
        ));
    }
    Ok(())
}

/// A signal's timing with its defaults: (enabled, forSeconds, clearSeconds).
pub fn timing(t: &Option<SignalTiming>) -> (bool, Duration, Duration) {
    let t = t.unwrap_or_default();
    (
        !t.disabled,
        Duration::from_secs(u64::from(t.for_seconds)),
        Duration::from_secs(u64::from(t.clear_seconds.unwrap_or(300))),
    )
}

/// Checks the detectors of a DetectorSet spec or the agent's config; the
/// prefix is where they sit (`spec`, `detectors`).
pub fn check_detectors(
    prefix: &str,
    plugins: &[CustomPluginMonitor],
    probes: &[Probe],
    resources: Option<&ResourceChecks>,
    hardware: Option<&HardwareChecks>,
) -> Result<(), ResourceError> {
    for (i, m) in plugins.iter().enumerate() {
        check_custom_plugin(m).map_err(|e| {
            let at = if e.field.is_empty() {
                String::new()
            } else {
                format!(".{}", e.field)
            };
            ResourceError::new(format!("{prefix}.customPluginMonitors[{i}]{at}"), e.message)
        })?;
    }
    check_probes(&format!("{prefix}.probes"), probes)?;
    if let Some(r) = resources {
        check_resources(&format!("{prefix}.resources"), r)?;
    }
    if let Some(h) = hardware {
        check_hardware(&format!("{prefix}.hardware"), h)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peers() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/npd/config")
    }

    #[test]
    fn every_npd_custom_plugin_file_loads_unchanged() {
        let mut loaded = Vec::new();
        for entry in std::fs::read_dir(peers()).expect("peers dir") {
            let path = entry.expect("entry").path();
            let text = std::fs::read_to_string(&path).expect("read");
            let v: serde_json::Value = serde_json::from_str(&text).expect("json");
            if v["plugin"] != "custom" {
                continue;
            }
            let m = parse_custom_plugin(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert!(!m.rules.is_empty(), "{}", path.display());
            loaded.push(
                path.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            );
        }
        for want in [
            "custom-plugin-monitor.json",
            "health-checker-kubelet.json",
            "health-checker-containerd.json",
            "health-checker-docker.json",
            "network-problem-monitor.json",
            "iptables-mode-monitor.json",
        ] {
            assert!(loaded.iter().any(|l| l == want), "{want} not loaded: {loaded:?}");
        }
    }

    #[test]
    fn npd_defaults_and_rule_overrides() {
        let m = parse_custom_plugin(
            r#"{"plugin": "custom", "pluginConfig": {"invoke_interval": "10s", "timeout": "3m"}, "source": "s",
                "conditions": [{"type": "C", "reason": "Fine", "message": "ok"}],
                "rules": [{"type": "permanent", "condition": "C", "reason": "Bad", "path": "/x", "timeout": "1m"},
                          {"type": "temporary", "reason": "T", "path": "/y", "invoke_interval": "2s"}]}"#,
        )
        .expect("valid");
        assert_eq!(m.invoke_interval(), Duration::from_secs(10));
        assert_eq!(m.rule_timeout(&m.rules[0]), Duration::from_secs(60));
        assert_eq!(m.rule_timeout(&m.rules[1]), Duration::from_secs(180));
        assert_eq!(m.rule_interval(&m.rules[1]), Duration::from_secs(2));
        assert_eq!((m.max_output_length(), m.concurrency()), (80, 3));
        assert!(!m.skip_initial_status() && !m.message_change_updates());
    }

    #[test]
    fn bad_plugins_probes_and_thresholds_name_the_field() {
        let bad = |t: &str| parse_custom_plugin(t).expect_err("refused");
        let base = r#""plugin": "custom", "source": "s", "conditions": [{"type": "C", "reason": "r", "message": "m"}]"#;
        let e = bad(&format!(
            r#"{{{base}, "rules": [{{"type": "permanent", "condition": "D", "reason": "x", "path": "/x"}}]}}"#
        ));
        assert_eq!(e.field, "rules[0].condition");
        let e = bad(&format!(
            r#"{{{base}, "pluginConfig": {{"timeout": "1s"}}, "rules": [{{"type": "temporary", "reason": "x", "path": "/x", "timeout": "2s"}}]}}"#
        ));
        assert_eq!(e.field, "rules[0].timeout");
        let e = bad(&format!(
            r#"{{{base}, "pluginConfig": {{"invoke_interval": "0s"}}, "rules": []}}"#
        ));
        assert_eq!(e.field, "pluginConfig.invoke_interval");
        let e = bad(&format!(
            r#"{{{base}, "pluginConfig": {{"invokeInterval": "1s"}}, "rules": []}}"#
        ));
        assert!(e.message.contains("invokeInterval"), "{e}");
        let e = bad(r#"{"plugin": "kmsg", "source": "s", "rules": []}"#);
        assert_eq!(e.field, "plugin");

        let probes = |y: &str| -> Vec<Probe> { serde_norway::from_str(y).expect("yaml") };
        let e = check_probes(
            "probes",
            &probes("- {name: a, http: {url: 'http://x:1/'}, tcp: {address: 'x:1'}}"),
        )
        .expect_err("two kinds");
        assert_eq!(e.field, "probes[0]");
        let e = check_probes("probes", &probes("- {name: a, tcp: {address: 'nohost'}}")).expect_err("address");
        assert_eq!(e.field, "probes[0].tcp.address");
        let e = check_probes(
            "probes",
            &probes("- {name: a, exec: {command: [/bin/true]}}\n- {name: a, exec: {command: [/bin/true]}}"),
        )
        .expect_err("duplicate");
        assert_eq!(e.field, "probes[1].name");
        let e = check_probes(
            "probes",
            &probes("- {name: a, periodSeconds: 1, timeoutSeconds: 2, exec: {command: [x]}}"),
        )
        .expect_err("timeout");
        assert_eq!(e.field, "probes[0].timeoutSeconds");
        let p = probes(
            "- {name: kubelet-unit, systemdUnit: {unit: kubelet.service}}\n- {name: kubelet, http: {url: 'http://127.0.0.1:10248/healthz'}}",
        );
        check_probes("probes", &p).expect("valid");
        assert_eq!(p[0].condition_type(), None, "a unit probe watches restarts unless told");
        assert_eq!(p[0].restart_condition().as_deref(), Some("FrequentKubeletRestart"));
        assert_eq!(p[1].condition_type().as_deref(), Some("KubeletUnhealthy"));
        assert_eq!(camel("docker.service"), "Docker");

        let r: ResourceChecks =
            serde_norway::from_str("memory: {available: {enter: 200Mi, exit: 300Mi}}\ncpu: {avg10: {enter: 150}}")
                .expect("yaml");
        assert_eq!(
            check_resources("resources", &r).expect_err("psi").field,
            "resources.cpu.avg10.enter"
        );
        let r: ResourceChecks = serde_norway::from_str("disk: {available: {enter: lots}}").expect("yaml");
        assert_eq!(
            check_resources("resources", &r).expect_err("q").field,
            "resources.disk.available.enter"
        );
        let h: HardwareChecks = serde_norway::from_str("taint: {flags: DQ}").expect("yaml");
        assert_eq!(
            check_hardware("hardware", &h).expect_err("flag").field,
            "hardware.taint.flags"
        );
    }
}
