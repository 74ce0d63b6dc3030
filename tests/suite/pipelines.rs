//! The workflow files in pipelines/ are well-formed and every btu command line in them parses
//! with the real CLI (the same clap definitions the binary uses).

use std::path::Path;

use btu::cli::Cli;
use clap::Parser;

use crate::util::root;

fn parses(args: &[String], what: &str) -> Cli {
    let mut full = vec!["btu".to_string()];
    full.extend(args.iter().cloned());
    Cli::try_parse_from(&full)
        .unwrap_or_else(|e| panic!("{what}: `{}` does not parse:\n{e}", full.join(" ")))
}

#[test]
fn argo_workflow_template_steps_parse_and_retry_only_temporary_failures() {
    let text =
        std::fs::read_to_string(root().join("pipelines/argo/btu-workflowtemplate.yaml")).unwrap();
    let doc: serde_yaml::Value = serde_yaml::from_str(&text).expect("well-formed YAML");
    assert_eq!(doc["kind"], "WorkflowTemplate");
    let params: Vec<(String, String)> = doc["spec"]["arguments"]["parameters"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap().to_string(),
                p["value"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let templates = doc["spec"]["templates"].as_sequence().unwrap();
    let mut commands = Vec::new();
    for t in templates {
        let Some(c) = t.get("container") else {
            continue;
        };
        let name = t["name"].as_str().unwrap();
        assert_eq!(c["command"][0], "btu", "{name}");
        let retry = &t["retryStrategy"];
        assert_eq!(
            retry["expression"], "asInt(lastRetry.exitCode) == 75",
            "{name} must retry only exit code 75"
        );
        let args: Vec<String> = c["args"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|a| {
                crate::util::fill_placeholders(a.as_str().expect("string arg"), &|k| {
                    if let Some(p) = k.strip_prefix("workflow.parameters.") {
                        params.iter().find(|(n, _)| n == p).map(|(_, v)| v.clone())
                    } else {
                        k.strip_prefix("inputs.parameters.")
                            .map(|p| format!("/work/{p}"))
                    }
                })
            })
            .collect();
        let cli = parses(&args, name);
        // Each step writes its summary to the file Argo reads as an output parameter.
        assert_eq!(
            cli.global.summary.as_deref(),
            Some(Path::new("/tmp/summary.json")),
            "{name}"
        );
        commands.push(cli.command.name());
    }
    for c in ["detect", "train", "unlearn", "export-onnx", "eval"] {
        assert!(commands.contains(&c), "no {c} step in the Argo template");
    }
}

#[test]
fn airflow_dag_compiles_and_its_steps_parse() {
    let dag = root().join("pipelines/airflow/btu_dag.py");
    let ok = std::process::Command::new("python3")
        .args(["-m", "py_compile"])
        .arg(&dag)
        .status()
        .unwrap();
    assert!(ok.success(), "the DAG does not compile");
    let script = "import ast,json,sys\nt=ast.parse(open(sys.argv[1]).read())\nv={}\nfor n in t.body:\n  if isinstance(n,ast.Assign) and isinstance(n.targets[0],ast.Name) and n.targets[0].id in ('STEPS','PARAMS','COMMON','EDGES'):\n    v[n.targets[0].id]=ast.literal_eval(n.value)\nprint(json.dumps(v))";
    let o = std::process::Command::new("python3")
        .args(["-c", script])
        .arg(&dag)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let params = v["PARAMS"].as_object().unwrap();
    let common: Vec<String> = serde_json::from_value(v["COMMON"].clone()).unwrap();
    let steps = v["STEPS"].as_object().unwrap();
    let mut names = Vec::new();
    for (task, args) in steps {
        let mut args: Vec<String> = args
            .as_array()
            .unwrap()
            .iter()
            .map(|a| {
                crate::util::fill_placeholders(a.as_str().unwrap(), &|k| {
                    k.strip_prefix("params.")
                        .and_then(|p| params.get(p))
                        .and_then(|x| x.as_str())
                        .map(String::from)
                })
            })
            .collect();
        args.extend(common.iter().cloned());
        names.push(parses(&args, task).command.name());
    }
    for c in ["detect", "train", "unlearn", "export-onnx", "eval"] {
        assert!(names.contains(&c), "no {c} task in the DAG");
    }
    for e in v["EDGES"].as_array().unwrap() {
        for t in e.as_array().unwrap() {
            assert!(
                steps.contains_key(t.as_str().unwrap()),
                "edge to unknown task {t}"
            );
        }
    }
}

/// The TOML files of a pipelines folder, sorted.
fn tomls(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    out.sort();
    out
}

/// The default configurations (docs/results.md's table) differ only in their data, attack and
/// run directory: the method sections are the same in every file.
#[test]
fn default_configs_share_one_method() {
    let files = tomls(&root().join("pipelines/default"));
    assert!(
        files.len() >= 4,
        "SST-2 and HSOL, Add-Word and Add-Sent: {files:?}"
    );
    let method = |p: &Path| {
        let c = btu::steps::defend::DefendConfig::from_file(p)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        c.validate()
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        assert!(
            c.detect.prior_neutral && c.verify.enabled,
            "{}",
            p.display()
        );
        serde_json::json!({
            "seed": c.seed, "model": c.model, "detect": c.detect, "train": c.train,
            "verify": c.verify, "unlearn": c.unlearn, "eval": c.eval,
        })
    };
    let first = method(&files[0]);
    for f in &files[1..] {
        assert_eq!(
            method(f),
            first,
            "{} differs from {}",
            f.display(),
            files[0].display()
        );
    }
}

#[test]
fn defend_configs_in_pipelines_load_and_plan() {
    let dir = root().join("pipelines");
    let mut runs = std::collections::BTreeSet::new();
    for p in tomls(&dir).into_iter().chain(tomls(&dir.join("default"))) {
        let cfg = btu::steps::defend::DefendConfig::from_file(&p)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        cfg.validate()
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        let cli = parses(
            &[
                "--dry-run".into(),
                "defend".into(),
                "--config".into(),
                p.display().to_string(),
            ],
            "config",
        );
        let plan = cli
            .command
            .plan()
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        // Each configuration runs into a directory of its own, named after the file.
        let run = plan["outputs"][0].as_str().unwrap().to_string();
        let stem = p.file_stem().unwrap().to_str().unwrap();
        assert!(
            Path::new(&run).ends_with(stem),
            "{}: run directory {run} is not named after the file",
            p.display()
        );
        assert_eq!(
            plan["outputs"][1],
            Path::new(&run).join("metrics.json").display().to_string(),
            "{}",
            p.display()
        );
        assert!(
            runs.insert(run.clone()),
            "{}: run directory {run} is another configuration's too",
            p.display()
        );
    }
    assert!(runs.len() >= 4, "the paper's SST-2 settings: four attacks");
}

#[test]
fn dockerfile_builds_btu_and_ships_onnxruntime() {
    let d = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    assert!(d.contains("cargo build --release"));
    assert!(d.contains("onnxruntime==1.31.1"));
    assert!(d.contains("ORT_DYLIB_PATH"));
}

/// Every Argo file in pipelines/argo validates against Argo's own JSON schema (v4.1.2, vendored
/// in pipelines/argo/schema), made strict: an unknown field anywhere is an error, as the Argo
/// server's strict decoding makes it.
#[test]
fn argo_files_validate_against_argos_schema() {
    let python = crate::util::venv_python();
    if !python.is_file() {
        crate::util::skip(&format!(
            "{} is absent (make setup makes it)",
            python.display()
        ));
        return;
    }
    let script = r##"
import copy, glob, json, sys, yaml, jsonschema
schema = json.load(open(sys.argv[1]))
defs = copy.deepcopy(schema["definitions"])
for d in defs.values():
    if "properties" in d and "additionalProperties" not in d:
        d["additionalProperties"] = False
kinds = {"WorkflowTemplate": "io.argoproj.workflow.v1alpha1.WorkflowTemplate",
         "Workflow": "io.argoproj.workflow.v1alpha1.Workflow"}
files = sorted(glob.glob(sys.argv[2] + "/*.yaml"))
errors = 0
for path in files:
    doc = yaml.safe_load(open(path))
    ref = {"$ref": "#/definitions/" + kinds[doc["kind"]], "definitions": defs}
    for e in jsonschema.Draft202012Validator(ref).iter_errors(doc):
        errors += 1
        print(path, list(e.absolute_path), e.message[:200], file=sys.stderr)
    # The check can fail: the same document with one unknown field does.
    bad = copy.deepcopy(doc)
    bad["spec"]["templates"][0]["unknownField"] = 1
    assert list(jsonschema.Draft202012Validator(ref).iter_errors(bad)), path
print(json.dumps({"files": [p.rsplit("/", 1)[1] for p in files], "errors": errors}))
"##;
    let argo = crate::util::root().join("pipelines/argo");
    let o = std::process::Command::new(python)
        .args(["-c", script])
        .arg(argo.join("schema/argo-workflows-v4.1.2.schema.json"))
        .arg(&argo)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["errors"], 0, "{err}");
    assert_eq!(
        v["files"],
        serde_json::json!(["btu-scan-fanout.yaml", "btu-workflowtemplate.yaml"])
    );
}

/// The DAGs in pipelines/airflow import with Airflow itself (apache-airflow and its Kubernetes
/// provider from PyPI, in the venv `make setup` makes): no import error, the tasks and edges
/// meant, the fan-out's scan a mapped task over the plan's output.
#[test]
fn airflow_dags_import_with_airflow() {
    let python = crate::util::root().join(".venv-airflow/bin/python");
    if !python.is_file() {
        crate::util::skip(&format!(
            "{} is absent (make setup makes it)",
            python.display()
        ));
        return;
    }
    let script = r#"
import json, sys
from airflow.models.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1], include_examples=False)
out = {"errors": {k: str(v) for k, v in bag.import_errors.items()}, "dags": {}}
for dag_id, dag in bag.dags.items():
    out["dags"][dag_id] = {
        t.task_id: {"type": type(t).__name__, "upstream": sorted(t.upstream_task_ids),
                    "retries": t.retries, "mapped": hasattr(t, "expand_input")}
        for t in dag.tasks
    }
json.dump(out, open(sys.argv[2], "w"))
"#;
    let home = tempfile::tempdir().unwrap();
    let result = home.path().join("dags.json");
    let o = std::process::Command::new(python)
        .args(["-c", script])
        .arg(crate::util::root().join("pipelines/airflow"))
        .arg(&result)
        .env("AIRFLOW_HOME", home.path())
        .env("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    // (Airflow logs to standard output; the result goes to a file.)
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&result).unwrap()).unwrap();
    assert_eq!(v["errors"], serde_json::json!({}), "import errors");
    let defend = &v["dags"]["btu_defend"];
    for t in [
        "detect",
        "train",
        "unlearn",
        "export_victim",
        "eval_repaired",
    ] {
        assert_eq!(defend[t]["type"], "BtuPodOperator", "{t}: {defend}");
    }
    assert_eq!(
        defend["unlearn"]["upstream"],
        serde_json::json!(["detect", "train"])
    );
    let fan = &v["dags"]["btu_scan_fanout"];
    assert_eq!(fan["scan"]["mapped"], true, "{fan}");
    assert_eq!(fan["scan"]["upstream"], serde_json::json!(["plan"]));
    assert_eq!(fan["merge"]["upstream"], serde_json::json!(["scan"]));
    assert_eq!(fan["plan"]["retries"], 3);
}
