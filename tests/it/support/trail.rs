//! Reading an audit trail directory back in a test: every record of every
//! trail file (`audit-<seq>.jsonl`), in chain order.

use std::path::{Path, PathBuf};

use dcvv_gateway::audit::record::{Fields, parse_file_name};

/// Every record of the trail in `dir`, first to last. Records are durable
/// before their response, so this may run while the gateway serves.
pub fn records(dir: &Path) -> Vec<Fields> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| parse_file_name(p.file_name().unwrap().to_str().unwrap()).is_some())
        .collect();
    files.sort();
    files
        .iter()
        .flat_map(|f| {
            std::fs::read_to_string(f)
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str::<Fields>(l).unwrap())
                .collect::<Vec<_>>()
        })
        .collect()
}
