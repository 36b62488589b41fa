//! Hardware health that only vendor tools can read, where those tools are
//! installed: disks through `smartctl --json` (smartmontools) and NVIDIA
//! GPUs through `nvidia-smi -q -x`. Both run through the check shim (a
//! deadline, nothing left behind); a node without the tool says so once.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use nodekeeper_proto::v1::{Event, GpuCheck, SmartCheck};
use serde_json::Value;

use super::run::{MAX_TOOL_OUTPUT, RunResult, run_capturing};
use super::tracker::Group;
use super::{Once, commit};
use crate::runtime::Agent;

const TOOL_TIMEOUT: Duration = Duration::from_secs(60);

/// Whether `cmd` can be run: a path that exists, or a name found in PATH.
fn installed(cmd: &str) -> bool {
    if cmd.contains('/') {
        return std::path::Path::new(cmd).exists();
    }
    std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(cmd).is_file()))
}

/// Devices from `smartctl --scan --json`: (name, type).
pub fn smart_scan(json: &str) -> Vec<(String, String)> {
    let v: Value = serde_json::from_str(json).unwrap_or(Value::Null);
    v["devices"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|d| {
            Some((
                d["name"].as_str()?.to_string(),
                d["type"].as_str().unwrap_or_default().to_string(),
            ))
        })
        .collect()
}

/// What `smartctl --json -H -A` says of one disk: None when healthy, else
/// (reason, message). `Err` when the disk could not be read.
pub fn smart_verdict(device: &str, json: &str) -> Result<Option<(&'static str, String)>, String> {
    let v: Value = serde_json::from_str(json).map_err(|e| format!("smartctl output for {device} is not JSON: {e}"))?;
    let exit = v["smartctl"]["exit_status"].as_u64().unwrap_or(0);
    if exit & 0b11 != 0 || v["smart_status"].is_null() {
        let why = v["smartctl"]["messages"]
            .as_array()
            .and_then(|m| m.first())
            .and_then(|m| m["string"].as_str())
            .unwrap_or("no SMART status");
        return Err(format!("smartctl cannot read {device}: {why}"));
    }
    let model = v["model_name"].as_str().unwrap_or_default();
    if v["smart_status"]["passed"] == false {
        return Ok(Some((
            "SmartFailing",
            format!("{device} {model}: SMART overall health self-assessment FAILED"),
        )));
    }
    let nvme = &v["nvme_smart_health_information_log"];
    if let Some(w) = nvme["critical_warning"].as_u64()
        && w != 0
    {
        return Ok(Some((
            "NvmeCriticalWarning",
            format!(
                "{device} {model}: NVMe critical warning {w:#04x} (available spare {}%, percentage used {}%, media errors {})",
                nvme["available_spare"], nvme["percentage_used"], nvme["media_errors"]
            ),
        )));
    }
    for attr in v["ata_smart_attributes"]["table"].as_array().into_iter().flatten() {
        let id = attr["id"].as_u64().unwrap_or(0);
        let raw = attr["raw"]["value"].as_u64().unwrap_or(0);
        if matches!(id, 197 | 198) && raw > 0 {
            return Ok(Some((
                "BadSectors",
                format!(
                    "{device} {model}: {} = {raw}",
                    attr["name"].as_str().unwrap_or("sectors")
                ),
            )));
        }
        if attr["when_failed"].as_str() == Some("now") {
            return Ok(Some((
                "SmartAttributeFailing",
                format!(
                    "{device} {model}: attribute {} is at or below its threshold",
                    attr["name"].as_str().unwrap_or("?")
                ),
            )));
        }
    }
    Ok(None)
}

/// None when healthy, else (reason, message).
pub type Verdict = Option<(&'static str, String)>;

/// Per GPU (its PCI id): its verdict.
pub fn gpu_verdicts(xml: &str) -> Result<Vec<(String, Verdict)>, String> {
    // nvidia-smi names its DTD (nvsmi_device_v12.dtd); it is not fetched.
    let opts = roxmltree::ParsingOptions {
        allow_dtd: true,
        ..Default::default()
    };
    let doc = roxmltree::Document::parse_with_options(xml, opts)
        .map_err(|e| format!("nvidia-smi -q -x output is not XML: {e}"))?;
    let text = |n: roxmltree::Node, path: &[&str]| -> Option<String> {
        let mut cur = n;
        for p in path {
            cur = cur.children().find(|c| c.has_tag_name(*p))?;
        }
        cur.text().map(|t| t.trim().to_string())
    };
    let mut out = Vec::new();
    for gpu in doc.descendants().filter(|n| n.has_tag_name("gpu")) {
        let id = gpu.attribute("id").unwrap_or("gpu").to_string();
        let name = text(gpu, &["product_name"]).unwrap_or_default();
        let num = |path: &[&str]| text(gpu, path).and_then(|t| t.parse::<u64>().ok()).unwrap_or(0);
        let yes = |path: &[&str]| text(gpu, path).is_some_and(|t| t.eq_ignore_ascii_case("yes"));
        let unc = num(&["ecc_errors", "volatile", "dram_uncorrectable"])
            + num(&["ecc_errors", "volatile", "sram_uncorrectable"])
            + num(&["ecc_errors", "volatile", "double_bit", "total"]);
        let verdict = if unc > 0 {
            Some((
                "UncorrectableECCErrors",
                format!("{id} {name}: {unc} uncorrected ECC errors since the driver loaded"),
            ))
        } else if yes(&["remapped_rows", "remapped_row_failure"])
            || yes(&["remapped_rows", "remapping_failure_occurred"])
        {
            Some((
                "RowRemappingFailure",
                format!("{id} {name}: row remapping failed; the GPU needs service"),
            ))
        } else if yes(&["remapped_rows", "remapped_row_pending"]) || yes(&["remapped_rows", "pending"]) {
            Some((
                "RowRemapPending",
                format!("{id} {name}: a row remap is pending; the GPU needs a reset"),
            ))
        } else if yes(&["retired_pages", "pending_retirement"]) || yes(&["retired_pages", "pending_blacklist"]) {
            Some((
                "PagesPendingRetirement",
                format!("{id} {name}: retired pages are pending; the GPU needs a reset"),
            ))
        } else {
            None
        };
        out.push((id, verdict));
    }
    Ok(out)
}

/// What both tool checks share: the command and its period, one
/// condition for all disks or GPUs, and saying each trouble once per disk.
struct Tool {
    cmd: String,
    period: Duration,
    source: &'static str,
    group: Group,
    started: bool,
    said: BTreeMap<String, Once>,
}

impl Tool {
    fn new(
        agent: &Agent,
        (command, default_command): (&str, &str),
        (period, default_period): (u32, u32),
        kind: &str,
        source: &'static str,
        healthy: &str,
    ) -> Tool {
        Tool {
            cmd: if command.is_empty() { default_command } else { command }.to_string(),
            period: Duration::from_secs(u64::from(if period == 0 { default_period } else { period })),
            source,
            group: Group::new(
                kind,
                source,
                healthy,
                "no problem found",
                (Duration::ZERO, Duration::ZERO),
                &super::restored(agent, source),
            ),
            started: false,
            said: BTreeMap::new(),
        }
    }

    /// An event about `key` (a disk, or "" for the tool), once per message.
    fn say(&mut self, key: &str, reason: &str, severity: &str, message: String, events: &mut Vec<Event>) {
        events.extend(
            self.said
                .entry(key.to_string())
                .or_default()
                .say(self.source, reason, severity, message),
        );
    }

    /// Says once that the tool is not installed, and whether it is not.
    fn missing(&mut self, what: &str, events: &mut Vec<Event>) -> bool {
        if installed(&self.cmd) {
            return false;
        }
        let m = format!("{} is not installed; {what} is not checked", self.cmd);
        self.say("", "CheckNotApplicable", "Info", m, events);
        true
    }

    fn observe(&mut self, member: &str, bad: Option<(&str, &str)>) {
        self.group.observe(member, bad, SystemTime::now());
    }

    /// Commits a pass: the condition (once at the start, and when it
    /// changed, with an event when its status changed) and the events.
    fn finish(&mut self, agent: &Agent, t0: Instant, mut events: Vec<Event>) {
        let mut out = Vec::new();
        if !std::mem::replace(&mut self.started, true) {
            out.extend(self.group.initial());
        }
        let before = self.group.published.status.clone();
        if let Some(c) = self.group.publish(SystemTime::now()) {
            if c.status != before {
                events.push(super::transition_event(&c));
            }
            out.retain(|x| x.r#type != c.r#type);
            out.push(c);
        }
        agent.metrics.check_run(self.source, "done", t0.elapsed().as_secs_f64());
        commit(agent, out, events);
    }
}

fn output_or_error(what: &str, r: &RunResult) -> Result<String, String> {
    if let Some(e) = &r.start_error
        && r.exit_code.is_none()
    {
        return Err(format!("{what}: {e}"));
    }
    if r.timed_out {
        return Err(format!("{what} did not finish within {} s", TOOL_TIMEOUT.as_secs()));
    }
    Ok(r.stdout.clone())
}

fn ticker(period: Duration) -> tokio::time::Interval {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick
}

/// Disk health from smartctl, until aborted.
pub async fn run_smart(agent: Arc<Agent>, cfg: SmartCheck) {
    let mut t = Tool::new(
        &agent,
        (&cfg.command, "smartctl"),
        (cfg.period_seconds, 3600),
        "DiskUnhealthy",
        "hardware/smart",
        "DiskHealthy",
    );
    let mut tick = ticker(t.period);
    loop {
        tick.tick().await;
        let t0 = Instant::now();
        let mut events: Vec<Event> = Vec::new();
        if t.missing("disk health", &mut events) {
            commit(&agent, Vec::new(), events);
            continue;
        }
        let devices: Vec<(String, String)> = if cfg.devices.is_empty() {
            let argv = [t.cmd.clone(), "--scan".into(), "--json".into()];
            let r = run_capturing(&argv, TOOL_TIMEOUT, MAX_TOOL_OUTPUT).await;
            match output_or_error("smartctl --scan", &r) {
                Ok(o) => smart_scan(&o),
                Err(e) => {
                    t.say("", "ProbeFailed", "Warning", e, &mut events);
                    Vec::new()
                }
            }
        } else {
            cfg.devices.iter().map(|d| (d.clone(), String::new())).collect()
        };
        if devices.is_empty() {
            t.say(
                "",
                "CheckNotApplicable",
                "Info",
                "smartctl finds no disks on this node".into(),
                &mut events,
            );
        }
        for (dev, ty) in devices {
            let mut argv = vec![t.cmd.clone(), "--json".into(), "-H".into(), "-A".into(), "-i".into()];
            if !ty.is_empty() {
                argv.extend(["-d".into(), ty.clone()]);
            }
            argv.push(dev.clone());
            let r = run_capturing(&argv, TOOL_TIMEOUT, MAX_TOOL_OUTPUT).await;
            match output_or_error("smartctl", &r).and_then(|o| smart_verdict(&dev, &o)) {
                Ok(v) => t.observe(&dev, v.as_ref().map(|(r, m)| (*r, m.as_str()))),
                Err(e) => t.say(&dev, "ProbeFailed", "Warning", e, &mut events),
            }
        }
        t.finish(&agent, t0, events);
    }
}

/// GPU health from nvidia-smi, until aborted.
pub async fn run_gpu(agent: Arc<Agent>, cfg: GpuCheck) {
    let mut t = Tool::new(
        &agent,
        (&cfg.command, "nvidia-smi"),
        (cfg.period_seconds, 300),
        "GPUUnhealthy",
        "hardware/gpu",
        "GPUHealthy",
    );
    let mut tick = ticker(t.period);
    loop {
        tick.tick().await;
        let t0 = Instant::now();
        let mut events: Vec<Event> = Vec::new();
        if t.missing("GPU health", &mut events) {
            commit(&agent, Vec::new(), events);
            continue;
        }
        let argv = [t.cmd.clone(), "-q".into(), "-x".into()];
        let r = run_capturing(&argv, TOOL_TIMEOUT, MAX_TOOL_OUTPUT).await;
        // nvidia-smi failing on a node that has it: the driver or a GPU is gone.
        let failed = match (r.exit_code, r.timed_out) {
            (Some(0), false) => None,
            _ => Some(format!(
                "nvidia-smi failed ({}): {}",
                if r.timed_out {
                    "timed out".to_string()
                } else {
                    format!("exit {}", r.exit_code.map_or("signal".into(), |c| c.to_string()))
                },
                super::plugin::cut(r.stdout.trim(), 300).0
            )),
        };
        t.observe("nvidia-smi", failed.as_deref().map(|m| ("NvidiaSmiFailed", m)));
        if failed.is_none() {
            match gpu_verdicts(&r.stdout) {
                Ok(gpus) => {
                    for (id, v) in gpus {
                        t.observe(&id, v.as_ref().map(|(r, m)| (*r, m.as_str())));
                    }
                }
                Err(e) => t.say("", "ProbeFailed", "Warning", e, &mut events),
            }
        }
        t.finish(&agent, t0, events);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smartctl_json_of_ata_and_nvme_disks() {
        let scan = r#"{"json_format_version":[1,0],"smartctl":{"version":[7,3],"exit_status":0},"devices":[{"name":"/dev/sda","info_name":"/dev/sda [SAT]","type":"sat","protocol":"ATA"},{"name":"/dev/nvme0","info_name":"/dev/nvme0","type":"nvme","protocol":"NVMe"}]}"#;
        assert_eq!(
            smart_scan(scan),
            vec![("/dev/sda".into(), "sat".into()), ("/dev/nvme0".into(), "nvme".into())]
        );
        let ata = |pending: u64, passed: bool| {
            format!(
                r#"{{"smartctl":{{"exit_status":0}},"device":{{"name":"/dev/sda","type":"sat","protocol":"ATA"}},"model_name":"ST4000NM0035","smart_status":{{"passed":{passed}}},"ata_smart_attributes":{{"revision":10,"table":[{{"id":5,"name":"Reallocated_Sector_Ct","value":100,"worst":100,"thresh":10,"when_failed":"","raw":{{"value":0,"string":"0"}}}},{{"id":197,"name":"Current_Pending_Sector","value":100,"worst":100,"thresh":0,"when_failed":"","raw":{{"value":{pending},"string":"{pending}"}}}}]}}}}"#
            )
        };
        assert_eq!(smart_verdict("/dev/sda", &ata(0, true)), Ok(None));
        let v = smart_verdict("/dev/sda", &ata(8, true)).expect("read").expect("bad");
        assert_eq!(v.0, "BadSectors");
        assert!(v.1.contains("Current_Pending_Sector = 8"), "{v:?}");
        assert_eq!(
            smart_verdict("/dev/sda", &ata(0, false)).expect("read").map(|v| v.0),
            Some("SmartFailing")
        );
        let nvme = r#"{"smartctl":{"exit_status":0},"model_name":"SAMSUNG MZQL23T8HCLS","smart_status":{"passed":true,"nvme":{"value":1}},"nvme_smart_health_information_log":{"critical_warning":1,"temperature":40,"available_spare":5,"available_spare_threshold":10,"percentage_used":7,"media_errors":0}}"#;
        let v = smart_verdict("/dev/nvme0", nvme).expect("read").expect("bad");
        assert_eq!(v.0, "NvmeCriticalWarning");
        let unreadable = r#"{"smartctl":{"exit_status":2,"messages":[{"string":"Smartctl open device: /dev/sdz failed: No such device","severity":"error"}]}}"#;
        assert!(
            smart_verdict("/dev/sdz", unreadable)
                .expect_err("unreadable")
                .contains("No such device")
        );
    }

    #[test]
    fn nvidia_smi_xml_of_old_and_new_drivers() {
        let new = |unc: u32, pending: &str, failure: &str| {
            format!(
                "<?xml version=\"1.0\" ?>\n<!DOCTYPE nvidia_smi_log SYSTEM \"nvsmi_device_v12.dtd\">\n<nvidia_smi_log>\n\t<driver_version>535.129.03</driver_version>\n\t<attached_gpus>1</attached_gpus>\n\t<gpu id=\"00000000:3B:00.0\">\n\t\t<product_name>NVIDIA A100-SXM4-80GB</product_name>\n\t\t<ecc_errors>\n\t\t\t<volatile>\n\t\t\t\t<sram_correctable>0</sram_correctable>\n\t\t\t\t<sram_uncorrectable>0</sram_uncorrectable>\n\t\t\t\t<dram_correctable>12</dram_correctable>\n\t\t\t\t<dram_uncorrectable>{unc}</dram_uncorrectable>\n\t\t\t</volatile>\n\t\t</ecc_errors>\n\t\t<retired_pages>\n\t\t\t<pending_blacklist>N/A</pending_blacklist>\n\t\t\t<pending_retirement>N/A</pending_retirement>\n\t\t</retired_pages>\n\t\t<remapped_rows>\n\t\t\t<remapped_row_corr>0</remapped_row_corr>\n\t\t\t<remapped_row_unc>0</remapped_row_unc>\n\t\t\t<remapped_row_pending>{pending}</remapped_row_pending>\n\t\t\t<remapped_row_failure>{failure}</remapped_row_failure>\n\t\t</remapped_rows>\n\t</gpu>\n</nvidia_smi_log>\n"
            )
        };
        assert_eq!(
            gpu_verdicts(&new(0, "No", "No")).expect("xml"),
            vec![("00000000:3B:00.0".to_string(), None)]
        );
        assert_eq!(
            gpu_verdicts(&new(2, "No", "No")).expect("xml")[0]
                .1
                .as_ref()
                .map(|v| v.0),
            Some("UncorrectableECCErrors")
        );
        assert_eq!(
            gpu_verdicts(&new(0, "Yes", "No")).expect("xml")[0]
                .1
                .as_ref()
                .map(|v| v.0),
            Some("RowRemapPending")
        );
        assert_eq!(
            gpu_verdicts(&new(0, "No", "Yes")).expect("xml")[0]
                .1
                .as_ref()
                .map(|v| v.0),
            Some("RowRemappingFailure")
        );
        // A V100 on an older driver: double_bit totals and pending_retirement.
        let old = "<?xml version=\"1.0\" ?>\n<nvidia_smi_log><driver_version>450.80.02</driver_version><gpu id=\"00000000:00:1E.0\"><product_name>Tesla V100-SXM2-16GB</product_name><ecc_errors><volatile><single_bit><device_memory>0</device_memory><total>0</total></single_bit><double_bit><device_memory>0</device_memory><total>0</total></double_bit></volatile></ecc_errors><retired_pages><multiple_single_bit_retirement><retired_count>0</retired_count></multiple_single_bit_retirement><pending_retirement>Yes</pending_retirement></retired_pages></gpu></nvidia_smi_log>";
        assert_eq!(
            gpu_verdicts(old).expect("xml")[0].1.as_ref().map(|v| v.0),
            Some("PagesPendingRetirement")
        );
        assert!(gpu_verdicts("not xml").is_err());
    }
}
