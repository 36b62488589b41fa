//! The rollout machine without I/O: a simulated fleet whose agents finish a
//! released change one pass later (some fail), checked pass by pass.

use super::*;
use nodekeeper_proto::v1::{Canary, TimeWindow, UpdateStrategy};

#[derive(Clone)]
struct Sim {
    name: String,
    group: Option<usize>,
    ready: bool,
    released: i64,
    generation: i64,
    phase: String,
    /// Fails any change to this revision.
    bad: Option<i64>,
}

fn fleet(groups: &[usize]) -> Vec<Sim> {
    let mut out = Vec::new();
    for (g, n) in groups.iter().enumerate() {
        for i in 0..*n {
            out.push(Sim {
                name: format!("g{g}-n{i:03}"),
                group: Some(g),
                ready: true,
                released: 1,
                generation: 1,
                phase: phase::DONE.into(),
                bad: None,
            });
        }
    }
    out
}

fn spec(ru: RollingUpdate) -> ComponentSpec {
    ComponentSpec {
        version: "2".into(),
        update_strategy: Some(UpdateStrategy {
            r#type: String::new(),
            rolling_update: Some(ru),
        }),
        ..Default::default()
    }
}

fn obs(sim: &[Sim]) -> Vec<NodeObs<'_>> {
    sim.iter()
        .map(|s| NodeObs {
            name: &s.name,
            group: s.group,
            ready: s.ready,
            released: s.released,
            reported_generation: s.generation,
            reported_phase: &s.phase,
        })
        .collect()
}

fn groups(n: usize) -> Vec<String> {
    let mut g: Vec<String> = (0..n - 1).map(|i| format!("set{i}")).collect();
    g.push(OTHERS.into());
    g
}

/// One pass: agents finish what was released in the previous pass, then
/// the machine decides; returns the decisions.
fn pass(sim: &mut [Sim], spec: &ComponentSpec, rev: i64, ngroups: usize, st: &mut Option<State>, t: u64) -> Decisions {
    pass_at(sim, spec, rev, ngroups, st, Duration::from_secs(t))
}

/// [`pass`] at a time with a fraction of a second.
fn pass_at(
    sim: &mut [Sim],
    spec: &ComponentSpec,
    rev: i64,
    ngroups: usize,
    st: &mut Option<State>,
    t: Duration,
) -> Decisions {
    for s in sim.iter_mut() {
        if s.released == rev && s.generation != rev && s.ready {
            s.generation = rev;
            s.phase = if s.bad == Some(rev) { phase::FAILED } else { phase::DONE }.into();
        }
    }
    let d = next(spec, rev, &groups(ngroups), &obs(sim), st.as_ref(), UNIX_EPOCH + t);
    for n in &d.release {
        if let Some(s) = sim.iter_mut().find(|s| &s.name == n) {
            s.released = rev;
        }
    }
    *st = Some(d.state.clone());
    d
}

fn in_flight(sim: &[Sim], rev: i64, group: usize) -> usize {
    sim.iter()
        .filter(|s| s.group == Some(group) && s.released == rev && s.generation != rev)
        .count()
}

#[test]
fn canary_first_then_node_sets_in_order_with_soak_and_max_unavailable() {
    let mut sim = fleet(&[10, 10, 5]);
    let spec = spec(RollingUpdate {
        node_set_order: vec!["set0".into(), "set1".into()],
        canary: Some(Canary {
            nodes: "2".into(),
            soak_seconds: 30,
        }),
        max_unavailable: "3".into(),
        soak_seconds: 20,
        ..Default::default()
    });
    let mut st = None;
    let d = pass(&mut sim, &spec, 2, 3, &mut st, 1000);
    assert_eq!(d.release, vec!["g0-n000", "g0-n001"], "the canaries go first, alone");
    assert_eq!(d.status.node_sets[0].name, CANARY);
    let mut t = 1000;
    let mut first_release: BTreeMap<usize, u64> = BTreeMap::new();
    let mut completed: BTreeMap<usize, u64> = BTreeMap::new();
    for _ in 0..200 {
        t += 5;
        let d = pass(&mut sim, &spec, 2, 3, &mut st, t);
        for n in &d.release {
            let g = sim.iter().find(|s| &s.name == n).and_then(|s| s.group).expect("group");
            first_release.entry(g).or_insert(t);
        }
        for g in 0..3 {
            assert!(in_flight(&sim, 2, g) <= 3, "maxUnavailable 3 exceeded in group {g}");
            let done = sim.iter().filter(|s| s.group == Some(g)).all(|s| s.generation == 2);
            if done {
                completed.entry(g).or_insert(t);
            }
        }
        if d.status.phase == rollout_phase::COMPLETE {
            break;
        }
    }
    assert_eq!(st.as_ref().map(|s| s.phase.as_str()), Some(rollout_phase::COMPLETE));
    assert!(sim.iter().all(|s| s.generation == 2 && s.phase == phase::DONE));
    // The first NodeSet's other nodes wait out the canaries' soak (30 s).
    assert!(first_release[&0] >= 1000 + 30, "{first_release:?}");
    // Each next set waits for the previous one to complete and soak (20 s).
    assert!(
        first_release[&1] >= completed[&0] + 20,
        "{first_release:?} {completed:?}"
    );
    assert!(
        first_release[&2] >= completed[&1] + 20,
        "{first_release:?} {completed:?}"
    );
    assert_eq!(st.as_ref().map(|s| s.current_revision), Some(2));
}

#[test]
fn a_soak_lasts_its_full_seconds_whatever_the_fraction_the_group_completed_at() {
    let mut sim = fleet(&[1, 1]);
    let spec = spec(RollingUpdate {
        node_set_order: vec!["set0".into()],
        soak_seconds: 3,
        ..Default::default()
    });
    let mut st = None;
    let ms = Duration::from_millis;
    let d = pass_at(&mut sim, &spec, 2, 2, &mut st, ms(10_000));
    assert_eq!(d.release, vec!["g0-n000"]);
    // The first set completes at 10.9 s; the next may start at 13.9 s at the
    // earliest, and the passes at 13.0 and 13.8 s must not release it.
    let d = pass_at(&mut sim, &spec, 2, 2, &mut st, ms(10_900));
    assert!(d.release.is_empty(), "{:?}", d.release);
    for at in [11_500, 13_000, 13_800] {
        let d = pass_at(&mut sim, &spec, 2, 2, &mut st, ms(at));
        assert!(d.release.is_empty(), "released at {at} ms, 3 s soak from 10.9 s");
        assert_eq!(d.status.node_sets[0].phase, set_phase::SOAKING);
    }
    let d = pass_at(&mut sim, &spec, 2, 2, &mut st, ms(14_000));
    assert_eq!(d.release, vec!["g1-n000"], "released once 3 s have passed");
}

#[test]
fn failures_pause_at_the_threshold_and_resume_accepts_them() {
    let mut sim = fleet(&[20]);
    for s in sim.iter_mut().step_by(3) {
        s.bad = Some(2);
    }
    let spec = spec(RollingUpdate {
        max_unavailable: "2".into(),
        failure_threshold: "3".into(),
        ..Default::default()
    });
    let mut st = None;
    let mut t = 0;
    let mut d = pass(&mut sim, &spec, 2, 1, &mut st, t);
    for _ in 0..50 {
        t += 1;
        d = pass(&mut sim, &spec, 2, 1, &mut st, t);
        if d.status.phase == rollout_phase::PAUSED {
            break;
        }
    }
    assert_eq!(
        d.status.phase,
        rollout_phase::PAUSED,
        "some nodes took it: paused, not failed"
    );
    assert!(d.status.reason.contains("failureThreshold 3"), "{}", d.status.reason);
    assert!(d.events.iter().any(|(r, _)| r == "RolloutPaused"));
    let failed = sim.iter().filter(|s| s.phase == phase::FAILED).count();
    assert!((3..=4).contains(&failed), "{failed}");
    let released = sim.iter().filter(|s| s.released == 2).count();
    for _ in 0..10 {
        t += 1;
        let d = pass(&mut sim, &spec, 2, 1, &mut st, t);
        assert!(d.release.is_empty(), "a paused rollout releases nothing");
    }
    assert_eq!(sim.iter().filter(|s| s.released == 2).count(), released);
    // Resume accepts those failures: it goes on until three more fail.
    if let Some(s) = st.as_mut() {
        resume(s, failed as u64);
    }
    t += 1;
    let d = pass(&mut sim, &spec, 2, 1, &mut st, t);
    assert_eq!(d.status.phase, rollout_phase::PROGRESSING);
    assert!(!d.release.is_empty());
}

#[test]
fn partition_keeps_the_last_nodes_and_not_ready_ones_are_skipped_not_waited_for() {
    let mut sim = fleet(&[10]);
    sim[1].ready = false; // NotReady before the rollout reaches it
    let spec = spec(RollingUpdate {
        max_unavailable: "1".into(),
        partition: "30%".into(),
        ..Default::default()
    });
    let mut st = None;
    let mut d = pass(&mut sim, &spec, 2, 1, &mut st, 0);
    for t in 1..60 {
        d = pass(&mut sim, &spec, 2, 1, &mut st, t);
        if d.status.phase == rollout_phase::COMPLETE {
            break;
        }
    }
    assert_eq!(
        d.status.phase,
        rollout_phase::COMPLETE,
        "a NotReady node does not stall it"
    );
    assert_eq!(d.status.skipped_nodes, vec!["g0-n001"]);
    let g = &d.status.node_sets[0];
    assert_eq!((g.partitioned, g.skipped, g.updated), (3, 1, 6));
    for s in &sim[7..] {
        assert_eq!(s.released, 1, "{} is in the partition", s.name);
    }
    // Ready again: released like any other node.
    sim[1].ready = true;
    let d = pass(&mut sim, &spec, 2, 1, &mut st, 100);
    assert_eq!(d.release, vec!["g0-n001"]);
}

#[test]
fn windows_paused_and_all_at_once() {
    let mut sim = fleet(&[4]);
    // 1970-01-01 was a Thursday; a window 01:00-02:00 UTC.
    let mut s = spec(RollingUpdate {
        windows: vec![TimeWindow {
            days: vec![],
            start: "01:00".into(),
            end: "02:00".into(),
            time_zone: String::new(),
        }],
        ..Default::default()
    });
    let mut st = None;
    let d = pass(&mut sim, &s, 2, 1, &mut st, 600);
    assert!(d.release.is_empty(), "outside the window");
    assert!(d.status.reason.contains("window"), "{}", d.status.reason);
    let d = pass(&mut sim, &s, 2, 1, &mut st, 3700);
    assert_eq!(d.release.len(), 1, "inside the window");
    s.paused = true;
    let d = pass(&mut sim, &s, 2, 1, &mut st, 3701);
    assert_eq!(d.status.phase, rollout_phase::PAUSED);
    assert!(d.release.is_empty());
    let all = ComponentSpec {
        update_strategy: Some(UpdateStrategy {
            r#type: ALL_AT_ONCE.into(),
            rolling_update: None,
        }),
        ..Default::default()
    };
    let mut sim = fleet(&[5, 5]);
    sim[0].ready = false;
    let mut st = None;
    let d = pass(&mut sim, &all, 2, 2, &mut st, 0);
    assert_eq!(d.release.len(), 10, "every node at once, NotReady ones too");
}

#[test]
fn a_new_revision_mid_rollout_starts_over_from_where_nodes_are() {
    let mut sim = fleet(&[6]);
    let spec = spec(RollingUpdate::default());
    let mut st = None;
    for t in 0..3 {
        pass(&mut sim, &spec, 2, 1, &mut st, t);
    }
    let d = pass(&mut sim, &spec, 3, 1, &mut st, 10);
    assert!(d.events.iter().any(|(r, _)| r == "RolloutStarted"));
    assert_eq!(
        d.state.current_revision, 0,
        "revision 2 never completed, so the current one is still the first's"
    );
    assert_eq!(d.release.len(), 1);
    // A completed rollout's revision becomes the next one's current.
    let mut sim = fleet(&[2]);
    let mut st = None;
    for t in 0..10 {
        pass(&mut sim, &spec, 2, 1, &mut st, t);
    }
    let d = pass(&mut sim, &spec, 3, 1, &mut st, 20);
    assert_eq!(d.state.current_revision, 2);
}

#[test]
fn a_version_no_node_takes_fails_the_rollout() {
    let mut sim = fleet(&[10]);
    for s in sim.iter_mut() {
        s.bad = Some(2);
    }
    let spec = spec(RollingUpdate {
        max_unavailable: "2".into(),
        failure_threshold: "2".into(),
        ..Default::default()
    });
    let mut st = None;
    let mut d = pass(&mut sim, &spec, 2, 1, &mut st, 0);
    for t in 1..10 {
        d = pass(&mut sim, &spec, 2, 1, &mut st, t);
    }
    assert_eq!(d.status.phase, rollout_phase::FAILED, "{:?}", d.status);
    assert!(d.release.is_empty());
    assert_eq!(
        sim.iter().filter(|s| s.released == 2).count(),
        2,
        "two tried, the rest never did"
    );
}
