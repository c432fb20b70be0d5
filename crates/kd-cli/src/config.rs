//! `--config FILE`: a TOML table of flag values, `lr = 3e-5`, `max-train = 4000`, `json = true`,
//! equivalent to the command-line flags of the same (long) names.
//!
//! It works on the command line itself, before clap parses it, so every command and flag takes
//! part without knowing about it: the file's pairs are spliced in as `--key=value` right after
//! the subcommand, ahead of the user's own flags, except those the command line gives itself
//! (it wins). Clap then checks everything as usual; an error it reports about a flag that came
//! from the file is rewritten to name the file and the key's line.
use std::collections::HashSet;
use std::ffi::OsString;
use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};
use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::{ArgMatches, Command};
use toml::de::{DeTable, DeValue};

/// A flag that came from the config file, and the line that set it.
struct FromFile {
    long: String,
    line: usize,
}

/// The spliced command line, and where its config values came from.
struct Expanded {
    args: Vec<OsString>,
    file: PathBuf,
    keys: Vec<FromFile>,
}

/// Parses the process's command line against `cmd` with its `--config` file applied. Help,
/// version and errors about the user's own flags exit as clap makes them; a problem with the
/// config file is returned as an error naming it.
pub fn matches(mut cmd: Command, args: Vec<OsString>) -> Result<ArgMatches> {
    cmd.build();
    let Some(expanded) = expand(&cmd, &args)? else {
        return Ok(cmd.get_matches_from(args));
    };
    cmd.try_get_matches_from_mut(&expanded.args).map_err(|e| expanded.blame(e))
}

/// The command line with the config file's flags spliced in, or `None` without `--config`.
fn expand(cmd: &Command, args: &[OsString]) -> Result<Option<Expanded>> {
    let Some((file, sub)) = find_config(cmd, args) else {
        return Ok(None);
    };
    // With no subcommand to apply it to, clap reports what is missing.
    let Some((sub_at, sub)) = sub else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(&file).with_context(|| format!("reading the config file {}", file.display()))?;
    let table = DeTable::parse(&text).map_err(|e| {
        let at = e.span().map(|s| format!(":{}", line_of(&text, s.start))).unwrap_or_default();
        anyhow!("{}{at}: {}", file.display(), e.message().trim())
    })?;
    let given: HashSet<String> = args[sub_at + 1..].iter().filter_map(|a| long_name(&a.to_string_lossy())).collect();
    let mut spliced = Vec::new();
    let mut keys = Vec::new();
    for (key, value) in table.get_ref() {
        let line = line_of(&text, key.span().start);
        let long = key.get_ref().replace('_', "-");
        let at = || format!("{}:{line}: '{}'", file.display(), key.get_ref());
        if long == "config" {
            bail!("{} cannot name another config file", at());
        }
        if given.contains(&long) {
            continue;
        }
        let arg = sub.get_arguments().find(|a| a.get_long() == Some(long.as_str()));
        let flag = OsString::from(format!("--{long}"));
        // `--key=value`, so that a value starting with '-' is not taken for a flag.
        let pair = |v: String| OsString::from(format!("--{long}={v}"));
        let takes_values = arg.is_none_or(|a| a.get_action().takes_values());
        match value.get_ref() {
            DeValue::Boolean(on) if !takes_values => {
                if *on {
                    spliced.push(flag);
                }
            }
            _ if !takes_values => bail!("{} is a switch: give true or false", at()),
            DeValue::Array(items) => {
                let values = items.iter().map(|v| scalar(v.get_ref())).collect::<Option<Vec<_>>>();
                let values = values.ok_or_else(|| anyhow!("{} lists something other than plain values", at()))?;
                let many = arg.and_then(|a| a.get_num_args()).is_some_and(|n| n.max_values() > 1);
                match arg.and_then(|a| a.get_value_delimiter()) {
                    Some(d) if !values.is_empty() => spliced.push(pair(values.join(&d.to_string()))),
                    _ if many && !values.is_empty() => {
                        spliced.extend(std::iter::once(flag).chain(values.into_iter().map(OsString::from)))
                    }
                    _ => spliced.extend(values.into_iter().map(pair)),
                }
            }
            other => {
                let v = scalar(other)
                    .ok_or_else(|| anyhow!("{} is a table; the file holds flag = value lines only", at()))?;
                spliced.push(pair(v));
            }
        }
        keys.push(FromFile { long, line });
    }
    let mut out = args[..=sub_at].to_vec();
    out.extend(spliced);
    out.extend_from_slice(&args[sub_at + 1..]);
    Ok(Some(Expanded { args: out, file, keys }))
}

/// The `--config` file, if given, and the innermost subcommand (`step` of `bench step`) with its
/// position in `args`.
fn find_config<'c>(cmd: &'c Command, args: &[OsString]) -> Option<(PathBuf, Option<(usize, &'c Command)>)> {
    let (mut file, mut sub) = (None, None);
    let mut current = cmd;
    let mut i = 1;
    while i < args.len() {
        let arg = args[i].to_string_lossy();
        if arg == "--" {
            break;
        } else if arg == "--config" {
            file = file.or_else(|| args.get(i + 1).map(PathBuf::from));
            i += 1;
        } else if let Some(path) = arg.strip_prefix("--config=") {
            file = file.or_else(|| Some(PathBuf::from(path)));
        } else if let Some(found) = current.find_subcommand(&args[i]) {
            sub = Some((i, found));
            current = found;
        }
        i += 1;
    }
    file.map(|f| (f, sub))
}

/// A TOML scalar as a command-line value.
fn scalar(value: &DeValue) -> Option<String> {
    match value {
        DeValue::String(s) => Some(s.to_string()),
        DeValue::Integer(n) if n.radix() == 10 => Some(n.as_str().to_string()),
        DeValue::Integer(n) => i128::from_str_radix(n.as_str(), n.radix()).ok().map(|n| n.to_string()),
        DeValue::Float(x) => Some(x.as_str().to_string()),
        DeValue::Boolean(b) => Some(b.to_string()),
        DeValue::Datetime(d) => Some(d.to_string()),
        DeValue::Array(_) | DeValue::Table(_) => None,
    }
}

/// `name` of a `--name` or `--name=value` argument.
fn long_name(arg: &str) -> Option<String> {
    arg.strip_prefix("--")?.split('=').next().filter(|n| !n.is_empty()).map(str::to_string)
}

/// The 1-based line of byte `offset` in `text`.
fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())].iter().filter(|&&b| b == b'\n').count() + 1
}

impl Expanded {
    /// Clap's error, as one line naming the file and line when it is about a flag from the file;
    /// else clap's own report and exit.
    fn blame(&self, e: clap::Error) -> anyhow::Error {
        if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
            e.exit();
        }
        let named = [ContextKind::InvalidArg, ContextKind::PriorArg].into_iter().filter_map(|k| match e.get(k) {
            Some(ContextValue::String(s)) => Some(s.clone()),
            _ => None,
        });
        let from_file = named
            .filter_map(|s| long_name(s.split(' ').next()?))
            .filter_map(|long| self.keys.iter().find(|k| k.long == long))
            .min_by_key(|k| k.line);
        let Some(key) = from_file else { e.exit() };
        let text = e.render().to_string();
        let lines: Vec<&str> = text
            .lines()
            .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
            .map(|l| l.trim().trim_start_matches("error: "))
            .filter(|l| !l.is_empty())
            .collect();
        anyhow!("{}:{}: {}", self.file.display(), key.line, lines.join("; "))
    }
}
