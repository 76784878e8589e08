//! The layer check of `cargo xtask test`: inside the agent, a module may use the modules of its
//! own layer and of the layers below it, never one above. The order is the table under
//! "## Layers" in ARCHITECTURE.md (bottom first), read from there so that the document and the
//! check cannot drift apart.
//!
//! A module's uses are every `crate::NAME` path in its files (in `use` lines, `use crate::{..}`
//! groups and paths in code), comments and `#[cfg(test)]` modules included: tests are code
//! others carry on too.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context, bail};

/// Checks the agent's sources under `root` against the layers in `architecture`.
pub(crate) fn check(root: &Path) -> anyhow::Result<()> {
    let doc =
        fs::read_to_string(root.join("ARCHITECTURE.md")).context("reading ARCHITECTURE.md")?;
    let layers = parse_layers(&doc)?;
    let src = root.join("balancer-agent/src");
    let mut problems = Vec::new();
    let mut files = Vec::new();
    rust_files(&src, &mut files)?;
    for file in files {
        let rel = file.strip_prefix(&src).expect("under src");
        let Some(module) = top_module(rel) else {
            continue;
        };
        let Some(&own) = layers.get(&module) else {
            problems.push(format!(
                "balancer-agent/src/{}: module `{module}` is in no layer of ARCHITECTURE.md",
                rel.display()
            ));
            continue;
        };
        let text = fs::read_to_string(&file)?;
        for (line, used) in uses(&text) {
            if used == module {
                continue;
            }
            match layers.get(&used) {
                Some(&l) if l > own => problems.push(format!(
                    "balancer-agent/src/{}:{line}: `{module}` (layer {own}) uses `{used}` (layer \
                     {l}), a layer above it",
                    rel.display()
                )),
                Some(_) => {}
                None => problems.push(format!(
                    "balancer-agent/src/{}:{line}: `{used}` is in no layer of ARCHITECTURE.md",
                    rel.display()
                )),
            }
        }
    }
    if !problems.is_empty() {
        bail!(
            "layer check: {} problem(s) (the order is under \"## Layers\" in ARCHITECTURE.md):\n  {}",
            problems.len(),
            problems.join("\n  ")
        );
    }
    eprintln!(
        "layer check: {} modules in {} layers, no use points up",
        layers.len(),
        layers.values().max().map_or(0, |m| m + 1)
    );
    Ok(())
}

/// The layers from ARCHITECTURE.md: the table after "## Layers", one row per layer, bottom
/// first; its first column is the layer's number, its second the modules, each in backticks.
fn parse_layers(doc: &str) -> anyhow::Result<BTreeMap<String, usize>> {
    let section = doc
        .split("\n## Layers")
        .nth(1)
        .context("ARCHITECTURE.md has no \"## Layers\" section")?;
    let section = section.split("\n## ").next().unwrap_or(section);
    let mut layers = BTreeMap::new();
    for row in section.lines().filter(|l| l.starts_with('|')) {
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        let (Some(num), Some(modules)) = (cells.get(1), cells.get(2)) else {
            continue;
        };
        let Ok(n) = num.parse::<usize>() else {
            continue;
        };
        for m in modules.split('`').skip(1).step_by(2) {
            layers.insert(m.to_string(), n);
        }
    }
    if layers.is_empty() {
        bail!("ARCHITECTURE.md's \"## Layers\" table names no module");
    }
    Ok(layers)
}

/// The top-level module of a file under `src/` (`relay/down.rs` is `relay`); none for the
/// crate roots.
fn top_module(rel: &Path) -> Option<String> {
    let first = rel.components().next()?.as_os_str().to_str()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    (!matches!(name, "lib" | "main")).then(|| name.to_string())
}

/// Every top-level module a file names through `crate::`, with the line it is on.
fn uses(text: &str) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let mut rest = line;
        while let Some(at) = rest.find("crate::") {
            let after = &rest[at + "crate::".len()..];
            if after.starts_with('{') {
                // A group: the first segment of each of its items.
                let group = group_of(text, line, i, at);
                found.extend(group.into_iter().map(|m| (i + 1, m)));
            } else {
                let name: String = after
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    found.push((i + 1, name));
                }
            }
            rest = after;
        }
    }
    found
}

/// The modules of a `crate::{..}` group starting on line `i` at column `at` (it may span lines).
fn group_of(text: &str, line: &str, i: usize, at: usize) -> Vec<String> {
    let start: usize = text.lines().take(i).map(|l| l.len() + 1).sum::<usize>()
        + (line.len() - line[at..].len())
        + "crate::{".len();
    let mut depth = 0;
    let mut items = Vec::new();
    let mut item = String::new();
    for c in text[start..].chars() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => break,
            '}' => depth -= 1,
            ',' if depth == 0 => items.push(std::mem::take(&mut item)),
            _ if depth == 0 => item.push(c),
            _ => {}
        }
    }
    items.push(item);
    items
        .iter()
        .map(|s| {
            s.trim()
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect::<String>()
        })
        .filter(|s| !s.is_empty() && s != "self")
        .collect()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            rust_files(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_groups_are_found() {
        let text = "use crate::{\n    config::ms,\n    proxy::{Proxy, grpc},\n};\nfn f() { crate::wire::frame::x(); }\n";
        let got: Vec<_> = uses(text).into_iter().map(|(_, m)| m).collect();
        assert_eq!(got, ["config", "proxy", "wire"]);
    }

    #[test]
    fn the_table_gives_each_module_its_layer() {
        let doc = "# A\n## Layers\n| layer | modules | role |\n| --- | --- | --- |\n| 0 | `wire`, `config` | x |\n| 1 | `relay` | y |\n## Next\n| 9 | `other` | |\n";
        let l = parse_layers(doc).unwrap();
        assert_eq!(l["wire"], 0);
        assert_eq!(l["relay"], 1);
        assert!(!l.contains_key("other"));
    }
}
