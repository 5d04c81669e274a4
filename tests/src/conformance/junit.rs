//! Ginkgo's JUnit report, read back.

use std::{fs, path::Path};

use serde::Deserialize;

/// How one spec ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Passed,
    Failed,
    Skipped,
}

/// One spec of the report.
#[derive(Clone, Debug)]
pub struct SpecResult {
    pub name: String,
    pub state: State,
    /// The failure's or skip's message (first line).
    pub message: String,
    pub seconds: f64,
}

#[derive(Deserialize)]
struct TestSuites {
    #[serde(rename = "@time", default)]
    time: f64,
    #[serde(rename = "testsuite", default)]
    suites: Vec<TestSuite>,
}

#[derive(Deserialize)]
struct TestSuite {
    #[serde(rename = "testcase", default)]
    cases: Vec<TestCase>,
}

#[derive(Deserialize)]
struct TestCase {
    #[serde(rename = "@name")]
    name: String,
    #[serde(rename = "@status", default)]
    status: String,
    #[serde(rename = "@time", default)]
    time: f64,
    failure: Option<Message>,
    error: Option<Message>,
    skipped: Option<Message>,
}

#[derive(Deserialize)]
struct Message {
    #[serde(rename = "@message", default)]
    message: String,
    /// ginkgo leaves `message` empty for failures and writes the text.
    #[serde(rename = "$text", default)]
    text: String,
}

impl Message {
    /// One line: the message, or the failure's text up to its location.
    fn line(&self) -> String {
        let text = if self.message.trim().is_empty() {
            self.text.split("\nIn [").next().unwrap_or_default()
        } else {
            self.message.lines().next().unwrap_or_default()
        };
        let line = text.split_whitespace().collect::<Vec<_>>().join(" ");
        match line.char_indices().nth(300) {
            Some((at, _)) => format!("{}...", &line[..at]),
            None => line,
        }
    }
}

/// A report: the suite's wall time and its specs.
pub struct Junit {
    pub seconds: f64,
    pub specs: Vec<SpecResult>,
}

/// The specs of a ginkgo JUnit report, named without ginkgo's `[It] `.
/// Suite nodes (`[SynchronizedBeforeSuite]`, `[ReportAfterSuite] ...`)
/// are left out unless they failed. A spec the focus or skip filtered out
/// is `Skipped` with the message `skipped`; one that skipped itself
/// carries its reason.
///
/// # Errors
///
/// When the file is missing or not a JUnit report.
pub fn read_junit(path: &Path) -> Result<Junit, String> {
    let text = fs::read_to_string(path).map_err(|err| err.to_string())?;
    let suites: TestSuites = quick_xml::de::from_str(&text).map_err(|err| err.to_string())?;
    let time = suites.time;
    let first_line = |message: Option<&Message>| message.map(Message::line);
    let specs = suites
        .suites
        .into_iter()
        .flat_map(|suite| suite.cases)
        .filter_map(|case| {
            let failed =
                first_line(case.failure.as_ref()).or_else(|| first_line(case.error.as_ref()));
            let state = if failed.is_some() || case.status == "failed" {
                State::Failed
            } else if case.skipped.is_some() || case.status == "skipped" {
                State::Skipped
            } else {
                State::Passed
            };
            let name = match case.name.strip_prefix("[It] ") {
                Some(spec) => spec.to_owned(),
                None if state == State::Failed => case.name,
                None => return None,
            };
            Some(SpecResult {
                message: failed
                    .or_else(|| first_line(case.skipped.as_ref()))
                    .unwrap_or_default(),
                name,
                state,
                seconds: case.time,
            })
        })
        .collect();
    Ok(Junit {
        seconds: time,
        specs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ginkgo_report_reads_back() {
        let dir = std::env::temp_dir().join(format!("svc-junit-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("junit_01.xml");
        fs::write(
            &path,
            r#"<?xml version="1.0" encoding="UTF-8"?>
<testsuites tests="4" disabled="1" errors="0" failures="1" time="30.5">
  <testsuite name="Kubernetes e2e suite" package="/" tests="4" disabled="1" skipped="1" errors="0" failures="1" time="30.5">
    <properties><property name="SuiteSucceeded" value="false"></property></properties>
    <testcase name="[SynchronizedBeforeSuite]" classname="Kubernetes e2e suite" status="passed" time="1.2"></testcase>
    <testcase name="[It] [sig-network] Services should serve a basic endpoint from pods [Conformance]" classname="Kubernetes e2e suite" status="passed" time="12.5"><system-err>log</system-err></testcase>
    <testcase name="[It] [sig-network] Services should be rejected when no endpoints exist" classname="Kubernetes e2e suite" status="failed" time="16.8"><failure message="" type="failed">[FAILED] expected&#xA;  REFUSED&#xA;In [It] at: service.go:1 @ 12/02/26&#xA;</failure></testcase>
    <testcase name="[It] [sig-network] DNS should provide DNS for the cluster [Provider:gce]" classname="Kubernetes e2e suite" status="skipped" time="0"><skipped message="skipped - Only supported for providers [gce] (not skeleton)"></skipped></testcase>
    <testcase name="[ReportAfterSuite] Kubernetes e2e suite report" classname="Kubernetes e2e suite" status="passed" time="0"></testcase>
  </testsuite>
</testsuites>"#,
        )
        .expect("write");
        let report = read_junit(&path).expect("reads");
        assert!((report.seconds - 30.5).abs() < 1e-9);
        let specs = report.specs;
        let _ = fs::remove_dir_all(&dir);
        let states: Vec<(State, &str)> = specs
            .iter()
            .map(|spec| (spec.state, spec.message.as_str()))
            .collect();
        assert_eq!(
            states,
            [
                (State::Passed, ""),
                (State::Failed, "[FAILED] expected REFUSED"),
                (
                    State::Skipped,
                    "skipped - Only supported for providers [gce] (not skeleton)"
                ),
            ]
        );
        assert_eq!(
            specs[0].name,
            "[sig-network] Services should serve a basic endpoint from pods [Conformance]"
        );
        assert!((specs[1].seconds - 16.8).abs() < 1e-9, "{specs:?}");
        assert!(read_junit(&dir.join("missing.xml")).is_err());
    }
}
