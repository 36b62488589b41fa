//! `nkctl get remedies [-w]`, `describe remedy JOB`, `remedy approve|deny
//! JOB`, `remedy breaker reset RULE`, and the RemedyRule table.

use std::collections::BTreeMap;
use std::time::Duration;

use hyper::Method;
use nodekeeper_proto::api::List;
use nodekeeper_proto::v1::{RemedyJob, RemedyRule};

use crate::client::{Client, Target};
use crate::output::{Format, age, structured};
use crate::table::Table;

fn row(j: &RemedyJob) -> Vec<String> {
    vec![
        j.id.clone(),
        j.node.clone(),
        j.rule.clone(),
        j.condition.clone(),
        j.phase.clone(),
        if j.action.is_empty() {
            "-".into()
        } else {
            format!("{}:{}", j.step + 1, j.action)
        },
        age(&j.start_time),
        j.reason.clone(),
    ]
}

const HEAD: &[&str] = &["JOB", "NODE", "RULE", "CONDITION", "PHASE", "STEP", "AGE", "REASON"];

/// Prints jobs as a table.
pub fn table(items: &[RemedyJob]) {
    let rows: Vec<Vec<String>> = items.iter().map(row).collect();
    Table::new(HEAD).print(&rows);
}

/// `nkctl get remedies [JOB] [-w]`: the list, then (`-w`) every change.
pub async fn get(hub: Target, query: &str, watch: bool, interval: Duration, out: Format) -> anyhow::Result<()> {
    let mut client = Client::new(hub);
    let path = format!("/v1/remedies{query}");
    let list: List<RemedyJob> = client.get(&path).await?;
    if matches!(out, Format::Json | Format::Yaml) && !watch {
        return structured(&list, out);
    }
    if list.items.is_empty() && !watch {
        eprintln!("No resources found.");
        return Ok(());
    }
    let mut seen: BTreeMap<String, String> = BTreeMap::new();
    let rows: Vec<Vec<String>> = list.items.iter().map(row).collect();
    for j in &list.items {
        seen.insert(j.id.clone(), j.update_time.clone() + &j.phase + &j.reason);
    }
    Table::new(HEAD).print(&rows);
    if !watch {
        return Ok(());
    }
    loop {
        tokio::time::sleep(interval).await;
        let list: List<RemedyJob> = client.get(&path).await?;
        let mut changed: Vec<&RemedyJob> = list
            .items
            .iter()
            .filter(|j| {
                seen.get(&j.id)
                    .is_none_or(|v| *v != j.update_time.clone() + &j.phase + &j.reason)
            })
            .collect();
        changed.reverse();
        for j in changed {
            seen.insert(j.id.clone(), j.update_time.clone() + &j.phase + &j.reason);
            println!("{}", row(j).join("\t"));
        }
    }
}

/// `nkctl describe remedy JOB`.
pub async fn describe(hub: Target, id: &str, out: Format) -> anyhow::Result<()> {
    let mut client = Client::new(hub);
    let j: RemedyJob = client.get(&format!("/v1/remedies/{id}")).await?;
    if out == Format::Json {
        return structured(&j, out);
    }
    println!("Job:         {}", j.id);
    println!("Node:        {}", j.node);
    println!("Rule:        {}", j.rule);
    println!("Condition:   {} (since {})", j.condition, j.condition_time);
    println!("Phase:       {}", j.phase);
    println!("Reason:      {}", j.reason);
    println!("Dry run:     {}", j.dry_run);
    println!(
        "Permit:      {}",
        if j.permit_id.is_empty() { "-" } else { &j.permit_id }
    );
    println!(
        "Approved by: {}",
        if j.approved_by.is_empty() { "-" } else { &j.approved_by }
    );
    println!("Started:     {}", j.start_time);
    println!("Ended:       {}", if j.end_time.is_empty() { "-" } else { &j.end_time });
    println!("Steps:");
    let rows: Vec<Vec<String>> = j
        .steps
        .iter()
        .map(|s| {
            vec![
                format!("{}", s.step + 1),
                s.action.clone(),
                s.start_time.clone(),
                if s.end_time.is_empty() {
                    "-".into()
                } else {
                    s.end_time.clone()
                },
                if s.result.is_empty() {
                    "running".into()
                } else {
                    s.result.clone()
                },
                s.message.clone(),
            ]
        })
        .collect();
    Table::new(&["  STEP", "ACTION", "STARTED", "ENDED", "RESULT", "MESSAGE"]).print(&rows);
    Ok(())
}

/// `nkctl remedy approve|deny JOB`.
pub async fn decide(hub: Target, id: &str, verb: &str) -> anyhow::Result<()> {
    let mut client = Client::new(hub);
    client
        .call(Method::POST, &format!("/v1/remedies/{id}/{verb}"), Some(String::new()))
        .await?;
    println!(
        "remedy job {id} {}",
        if verb == "approve" { "approved" } else { "denied" }
    );
    Ok(())
}

/// `nkctl remedy breaker reset RULE`.
pub async fn reset(hub: Target, rule: &str) -> anyhow::Result<()> {
    let mut client = Client::new(hub);
    client
        .call(
            Method::POST,
            &format!("/v1/remedyrules/{rule}/breaker/reset"),
            Some(String::new()),
        )
        .await?;
    println!("remedyrule/{rule} breaker reset");
    Ok(())
}

/// Prints RemedyRules.
pub fn rules(items: &[RemedyRule]) {
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|r| {
            let spec = r.spec.clone().unwrap_or_default();
            let st = r.status.clone().unwrap_or_default();
            vec![
                r.metadata.as_ref().map(|m| m.name.clone()).unwrap_or_default(),
                spec.conditions
                    .iter()
                    .map(|c| c.r#type.clone())
                    .collect::<Vec<_>>()
                    .join(","),
                spec.steps
                    .iter()
                    .map(|s| s.action.clone())
                    .collect::<Vec<_>>()
                    .join(">"),
                st.selected_nodes.to_string(),
                st.remediating_nodes.to_string(),
                st.pending_approvals.to_string(),
                if st.breaker_open {
                    "open".into()
                } else {
                    "closed".into()
                },
                if spec.dry_run {
                    "dry-run".into()
                } else if spec.approval.is_empty() {
                    "auto".into()
                } else {
                    spec.approval.clone()
                },
            ]
        })
        .collect();
    Table::new(&[
        "NAME",
        "CONDITIONS",
        "STEPS",
        "SELECTED",
        "REMEDIATING",
        "APPROVALS",
        "BREAKER",
        "MODE",
    ])
    .print(&rows);
}
