//! The repository stands alone: a user clones only it, so nothing in it may
//! read or link to files outside it (the development workspace beside it).

use std::path::Path;

fn walk(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let p = e.path();
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name == "target" || name == ".git" || name == "dist" {
            continue;
        }
        if p.is_dir() {
            walk(&p, out);
        } else {
            out.push(p);
        }
    }
}

#[test]
fn nothing_in_the_repository_reads_outside_it() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut files = Vec::new();
    walk(&root, &mut files);
    assert!(files.len() > 50, "walked {} files", files.len());
    // Spelled in two pieces so this file does not match itself.
    let needle = format!("{}/shared", "..");
    let bad: Vec<String> = files
        .iter()
        .filter_map(|p| {
            let text = std::fs::read_to_string(p).ok()?;
            text.contains(&needle).then(|| p.display().to_string())
        })
        .collect();
    assert!(bad.is_empty(), "files referring to {needle}: {bad:#?}");
    // The peer inputs the tests use are in the repository, with their licence.
    let npd = root.join("tests/fixtures/npd");
    assert!(npd.join("LICENSE").exists() && npd.join("README.md").exists());
    assert!(npd.join("config/kernel-monitor.json").exists());
    assert!(root.join("docs/architecture.md").exists());
}
