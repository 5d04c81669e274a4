//! `svc-cni`: the CNI plugin that attaches svc-proxy's pod program to a
//! new pod's veth before the pod starts (see `svc_agent::cni`). The
//! runtime runs it with the network configuration on stdin and `CNI_*`
//! variables; it prints a result or a CNI error object on stdout.

use std::{
    io::{Read as _, Write as _},
    process::ExitCode,
};

use svc_agent::cni::{self, CniError, code};

/// A network configuration is a few KiB; more is not one.
const MAX_STDIN: u64 = 1 << 20;

fn main() -> ExitCode {
    let env: cni::Env = std::env::vars_os()
        .filter_map(|(key, value)| Some((key.into_string().ok()?, value.into_string().ok()?)))
        .filter(|(key, _)| key.starts_with("CNI_"))
        .collect();
    let mut stdin = Vec::new();
    let read = std::io::stdin().take(MAX_STDIN + 1).read_to_end(&mut stdin);
    let outcome = match read {
        Err(err) => Err(CniError::new(
            code::IO_FAILURE,
            "reading the network configuration from stdin failed",
        )
        .details(err.to_string())),
        Ok(_) if stdin.len() as u64 > MAX_STDIN => Err(CniError::new(
            code::DECODE,
            format!("the network configuration on stdin is over {MAX_STDIN} bytes"),
        )),
        Ok(_) => cni::run(&stdin, &env),
    };
    let (text, status) = match &outcome {
        Ok(None) => return ExitCode::SUCCESS,
        Ok(Some(result)) => (serde_json::to_string(result), ExitCode::SUCCESS),
        Err(err) => (serde_json::to_string(err), ExitCode::FAILURE),
    };
    let mut stdout = std::io::stdout().lock();
    match text {
        Ok(text) if writeln!(stdout, "{text}").is_ok() => status,
        _ => ExitCode::FAILURE,
    }
}
