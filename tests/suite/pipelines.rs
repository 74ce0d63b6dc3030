//! The workflow files in pipelines/ are well-formed and every btu command line in them parses
//! with the real CLI (the same clap definitions the binary uses).

use std::path::{Path, PathBuf};

use btu::cli::Cli;
use clap::Parser;

use crate::util::root;

fn parses(args: &[String], what: &str) -> Cli {
    let mut full = vec!["btu".to_string()];
    full.extend(args.iter().cloned());
    Cli::try_parse_from(&full)
        .unwrap_or_else(|e| panic!("{what}: `{}` does not parse:\n{e}", full.join(" ")))
}

/// The btu commands the repair workflows run (the relabel branch's `relabel` and `train` too).
const REPAIR_COMMANDS: &[&str] = &[
    "detect",
    "verify",
    "unlearn",
    "relabel",
    "train",
    "export-onnx",
    "eval",
];

#[test]
fn argo_workflow_template_steps_parse_and_retry_only_temporary_failures() {
    for (file, needed) in [
        (
            "btu-workflowtemplate.yaml",
            &["detect", "train", "unlearn", "export-onnx", "eval"][..],
        ),
        ("btu-repair.yaml", REPAIR_COMMANDS),
    ] {
        argo_steps_parse(file, needed);
    }
}

/// Every container step of Argo file `file` runs btu with a command line that parses, writes
/// its summary where Argo reads it, retries only exit 75; the commands `needed` are there.
fn argo_steps_parse(file: &str, needed: &[&str]) {
    let text = std::fs::read_to_string(root().join("pipelines/argo").join(file)).unwrap();
    let doc: serde_yaml::Value = serde_yaml::from_str(&text).expect("well-formed YAML");
    assert_eq!(doc["kind"], "WorkflowTemplate");
    let params = crate::util::argo_parameters(&doc["spec"]["arguments"]["parameters"]);
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
    for c in needed {
        assert!(commands.contains(c), "no {c} step in {file}");
    }
}

#[test]
fn airflow_dag_compiles_and_its_steps_parse() {
    for (file, needed) in [
        (
            "btu_dag.py",
            &["detect", "train", "unlearn", "export-onnx", "eval"][..],
        ),
        ("btu_repair_dag.py", REPAIR_COMMANDS),
    ] {
        airflow_steps_parse(file, needed);
    }
}

/// DAG file `file` compiles; every command line of its STEPS parses; the commands `needed` are
/// there; its EDGES name its tasks.
fn airflow_steps_parse(file: &str, needed: &[&str]) {
    let dag = root().join("pipelines/airflow").join(file);
    let ok = std::process::Command::new("python3")
        .args(["-m", "py_compile"])
        .arg(&dag)
        .status()
        .unwrap();
    assert!(ok.success(), "{file} does not compile");
    let v = airflow_literals(&dag);
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
    for c in needed {
        assert!(names.contains(c), "no {c} task in {file}");
    }
    for e in v["EDGES"].as_array().unwrap() {
        for t in e.as_array().unwrap() {
            let t = t.as_str().unwrap();
            // DECISIONS: the repair DAG's branch tasks (not btu steps).
            let decision = v["DECISIONS"]
                .as_array()
                .is_some_and(|d| d.iter().any(|x| x == t));
            assert!(
                steps.contains_key(t) || decision,
                "{file}: edge to unknown task {t}"
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
            c.detect.prior_neutral && c.verify.enabled && c.relabel.enabled,
            "{}",
            p.display()
        );
        serde_json::json!({
            "seed": c.seed, "model": c.model, "detect": c.detect, "train": c.train,
            "verify": c.verify, "relabel": c.relabel, "unlearn": c.unlearn, "eval": c.eval,
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
    let folders = [dir.clone(), dir.join("default"), dir.join("reference-code")];
    for p in folders.iter().flat_map(|f| tomls(f)) {
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
        serde_json::json!([
            "btu-repair.yaml",
            "btu-scan-fanout.yaml",
            "btu-workflowtemplate.yaml"
        ])
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
    let repair = &v["dags"]["btu_repair"];
    assert_eq!(repair["unlearn"]["type"], "BtuPodOperator", "{repair}");
    assert_eq!(repair["unlearn"]["upstream"], serde_json::json!(["verify"]));
    assert_eq!(
        repair["has_test"]["type"], "ShortCircuitOperator",
        "{repair}"
    );
    assert_eq!(
        repair["eval_repaired"]["upstream"],
        serde_json::json!(["export_repaired", "export_tuned", "has_test"])
    );
    assert_eq!(
        repair["choose_model"]["type"], "BranchPythonOperator",
        "{repair}"
    );
    assert_eq!(
        repair["choose_model"]["upstream"],
        serde_json::json!(["tune", "unlearn"])
    );
    assert_eq!(
        repair["tune"]["upstream"],
        serde_json::json!(["relabelled", "unlearn"])
    );
    let fan = &v["dags"]["btu_scan_fanout"];
    assert_eq!(fan["scan"]["mapped"], true, "{fan}");
    assert_eq!(fan["scan"]["upstream"], serde_json::json!(["plan"]));
    assert_eq!(fan["merge"]["upstream"], serde_json::json!(["scan"]));
    assert_eq!(fan["plan"]["retries"], 3);
}

/// Which repair a workflow test runs: the fixture's `cf` verified (the default), or verification
/// made to confirm nothing (a bar no flip rate reaches), so that the labels are tested and the
/// repaired model tuned on the rows relabelled.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Branch {
    Verified,
    Relabel,
}

/// The parameters a workflow's repair runs with here: the fixture experiment's model and
/// poisoned corpus as a user's, and the demo's method for synthetic corpora (Frobenius
/// threshold, clean tuning at 1e-4, references and the tuning at the victim's 1e-3) where btu's
/// defaults are chosen for real models. `None`: the file's own default.
fn repair_params(name: &str, branch: Branch) -> Option<String> {
    let f = crate::fixtures::four_class();
    let p = |x: PathBuf| Some(x.display().to_string());
    match name.replace('_', "-").as_str() {
        "corpus" => p(f.run.join("poison/train.parquet")),
        "suspect" => p(f.run.join("victim")),
        "base" => p(f.run.join("model")),
        "clean" => p(f.data.join("clean.parquet")),
        "test" => p(f.data.join("test.parquet")),
        "threshold" => Some("frobenius".into()),
        "clean-lr" => Some("1e-4".into()),
        "reference-lr" | "tune-lr" => Some("1e-3".into()),
        "min-flip-rate" if branch == Branch::Relabel => Some("1".into()),
        _ => None,
    }
}

/// `btu defend`'s repair flow with the method the workflows' parameters name (`value`: a
/// parameter's value as the workflow runs it), in `run`.
fn defend_repair(run: &Path, value: &dyn Fn(&str) -> String) -> btu::steps::defend::DefendConfig {
    let f = crate::fixtures::four_class();
    let mut cfg = crate::fixtures::FourClass::config_for(&f.data, run);
    cfg.poison = None;
    cfg.data.train = vec![value("corpus")];
    cfg.model.path = Some(value("base").into());
    cfg.model.suspect = Some(value("suspect").into());
    cfg.detect.preset = clap::ValueEnum::from_str(&value("preset"), false).unwrap();
    cfg.detect.alpha = value("alpha").parse().unwrap();
    cfg.detect.lr = value("detect-lr").parse().unwrap();
    cfg.detect.prior_neutral = true;
    cfg.verify.min_flip_rate = value("min-flip-rate").parse().unwrap();
    cfg.unlearn.threshold = clap::ValueEnum::from_str(&value("threshold"), false).unwrap();
    cfg.unlearn.replacement = clap::ValueEnum::from_str(&value("replacement"), false).unwrap();
    cfg.unlearn.clean_epochs = value("clean-epochs").parse().unwrap();
    cfg.unlearn.clean_lr = value("clean-lr").parse().unwrap();
    cfg.relabel.reference_lr = value("reference-lr").parse().unwrap();
    cfg.relabel.min_doubt = value("min-doubt").parse().unwrap();
    cfg.relabel.neighbours = value("neighbours").parse().unwrap();
    cfg.relabel.tune_epochs = value("tune-epochs").parse().unwrap();
    // The repair flow trains nothing but the tuning, at the suspect's learning rate.
    cfg.train.lr = value("tune-lr").parse().unwrap();
    cfg.seed = value("seed").parse().unwrap();
    let path = run.with_extension("toml");
    std::fs::write(&path, toml::to_string(&cfg).unwrap()).unwrap();
    let m = crate::util::btu(["defend", "--config", crate::util::s(&path)]).ok();
    assert_eq!(m["flow"], "repair");
    cfg
}

/// The files a workflow's repair (its `/work`) and `btu defend`'s run directory share, equal
/// byte for byte, on either branch: `cf` verified and repaired, or nothing verified and the
/// repaired model tuned on the relabelled rows.
fn assert_same_repair(work: &Path, run: &Path, branch: Branch, what: &str) {
    let relabelled = (branch == Branch::Relabel).then_some("relabel/relabelled.parquet");
    for f in crate::util::repair_outputs().chain(relabelled) {
        let (a, b) = (work.join(f), run.join(f));
        assert!(
            std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap(),
            "{what}: {f} differs from btu defend's"
        );
    }
    if branch == Branch::Relabel {
        // The tuned weights, byte for byte (the provenance names the corpus's path, which differs).
        let f = "tuned/model.safetensors";
        assert!(
            tensors(&work.join(f)) == tensors(&run.join(f)),
            "{what}: {f} differs from btu defend's"
        );
    }
    let read = |f: &str| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(work.join(f)).unwrap()).unwrap()
    };
    let verify = read("verify/summary.json");
    match branch {
        Branch::Verified => {
            assert_eq!(
                verify["verified"],
                serde_json::json!(["cf"]),
                "{what}: {verify}"
            );
            assert!(!work.join("relabel").exists(), "{what}: relabel ran");
        }
        Branch::Relabel => {
            assert_eq!(
                verify["verified"],
                serde_json::json!([]),
                "{what}: {verify}"
            );
            let relabel = read("relabel/summary.json");
            assert_eq!(relabel["target"], 3, "{what}: {relabel}");
            assert!(relabel["relabelled"].as_u64().unwrap() > 0, "{what}");
        }
    }
}

/// A safetensors file's tensors: its header without `__metadata__`, and its data bytes.
fn tensors(path: &Path) -> (serde_json::Value, Vec<u8>) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    header.as_object_mut().unwrap().remove("__metadata__");
    (header, bytes[8 + n..].to_vec())
}

/// How an Argo DAG task ended, as the controller marks it: run, skipped by its `when`, or
/// omitted because its `depends` came out false.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Ended {
    Succeeded,
    Skipped,
    Omitted,
}

/// Argo's `depends` over the tasks ended so far: task names, optionally with `.Succeeded`,
/// `.Skipped` or `.Omitted`, joined by `&&` and `||`, with parentheses; a bare name holds when
/// the task succeeded or was skipped (Argo's meaning).
fn argo_depends(expr: &str, ended: &std::collections::BTreeMap<String, Ended>) -> bool {
    fn or(t: &[&str], at: &mut usize, e: &std::collections::BTreeMap<String, Ended>) -> bool {
        let mut v = and(t, at, e);
        while t.get(*at) == Some(&"||") {
            *at += 1;
            v |= and(t, at, e);
        }
        v
    }
    fn and(t: &[&str], at: &mut usize, e: &std::collections::BTreeMap<String, Ended>) -> bool {
        let mut v = atom(t, at, e);
        while t.get(*at) == Some(&"&&") {
            *at += 1;
            v &= atom(t, at, e);
        }
        v
    }
    fn atom(t: &[&str], at: &mut usize, e: &std::collections::BTreeMap<String, Ended>) -> bool {
        let tok = t[*at];
        *at += 1;
        if tok == "(" {
            let v = or(t, at, e);
            assert_eq!(t[*at], ")", "unbalanced depends");
            *at += 1;
            return v;
        }
        let (name, result) = tok.split_once('.').unwrap_or((tok, ""));
        let s = *e
            .get(name)
            .unwrap_or_else(|| panic!("depends on {name}, which is listed later"));
        match result {
            "" => matches!(s, Ended::Succeeded | Ended::Skipped),
            "Succeeded" => s == Ended::Succeeded,
            "Skipped" => s == Ended::Skipped,
            "Omitted" => s == Ended::Omitted,
            r => panic!("unknown task result {r}"),
        }
    }
    let spaced = expr.replace('(', " ( ").replace(')', " ) ");
    let tokens: Vec<&str> = spaced.split_whitespace().collect();
    let mut at = 0;
    let v = or(&tokens, &mut at, ended);
    assert_eq!(at, tokens.len(), "depends `{expr}` not read to its end");
    v
}

/// Argo's `when` of the repair template: the test-split guard, or a literal compared with an
/// earlier task's summary field (`LIT OP {{=jsonpath(tasks.T.outputs.parameters.summary,
/// '$.F')}}`, OP `==` with `true`/`false` or `<` with a number; the tag last, as Argo needs).
/// Anything else fails the test.
fn argo_when(
    when: &str,
    value: &dyn Fn(&str) -> String,
    summaries: &std::collections::BTreeMap<String, serde_json::Value>,
) -> bool {
    let Some((test, tag)) = when.split_once("{{=") else {
        assert_eq!(when, "'{{workflow.parameters.test}}' != ''");
        let cond = crate::util::fill_placeholders(when, &|k| {
            k.strip_prefix("workflow.parameters.").map(value)
        });
        return cond != "'' != ''";
    };
    let rest = tag.strip_prefix("jsonpath(tasks.").expect(when);
    let (task, rest) = rest
        .split_once(".outputs.parameters.summary, '$.")
        .expect(when);
    let field = rest.strip_suffix("')}}").expect(when);
    let got = &summaries
        .get(task)
        .unwrap_or_else(|| panic!("{when}: {task} did not run"))[field];
    match test.trim().split_once(' ').expect(when) {
        ("false", "==") => got == &serde_json::Value::Bool(false),
        ("true", "==") => got == &serde_json::Value::Bool(true),
        (n, "<") => n.parse::<f64>().expect(when) < got.as_f64().expect(when),
        _ => panic!("unknown when {when}"),
    }
}

/// Run the Argo repair template's DAG as its controller would: the tasks in their order, each
/// omitted when its `depends` is false and skipped when its `when` is, the others run (their
/// command lines, `/work` at `work`, Argo's summary file at `summary`). How each ended.
fn run_argo_repair(
    doc: &serde_yaml::Value,
    value: &dyn Fn(&str) -> String,
    work: &Path,
    summary: &Path,
) -> std::collections::BTreeMap<String, Ended> {
    let templates = doc["spec"]["templates"].as_sequence().unwrap();
    let template = |name: &str| templates.iter().find(|t| t["name"] == name).unwrap();
    let tasks = template("repair")["dag"]["tasks"].as_sequence().unwrap();
    let mut ended = std::collections::BTreeMap::new();
    let mut summaries = std::collections::BTreeMap::new();
    for task in tasks {
        let name = task["name"].as_str().unwrap().to_string();
        if let Some(dep) = task["depends"].as_str() {
            if !argo_depends(dep, &ended) {
                ended.insert(name, Ended::Omitted);
                continue;
            }
        }
        if let Some(when) = task["when"].as_str() {
            if !argo_when(when, value, &summaries) {
                ended.insert(name, Ended::Skipped);
                continue;
            }
        }
        let inputs = crate::util::argo_parameters(&task["arguments"]["parameters"]);
        let t = template(task["template"].as_str().unwrap());
        let args: Vec<String> = t["container"]["args"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|a| {
                let a = crate::util::fill_placeholders(a.as_str().unwrap(), &|k| {
                    if let Some(p) = k.strip_prefix("workflow.parameters.") {
                        return Some(value(p));
                    }
                    let p = k.strip_prefix("inputs.parameters.")?;
                    let v = &inputs.iter().find(|(n, _)| n == p)?.1;
                    Some(crate::util::fill_placeholders(v, &|k| {
                        k.strip_prefix("workflow.parameters.").map(value)
                    }))
                });
                on_volume(&a, work, summary)
            })
            .collect();
        crate::util::btu(&args).success();
        let s: serde_json::Value =
            serde_json::from_slice(&std::fs::read(summary).unwrap()).unwrap();
        summaries.insert(name.clone(), s);
        ended.insert(name, Ended::Succeeded);
    }
    ended
}

/// Run the Airflow repair DAG's steps as the scheduler would: STEPS in a topological order of
/// EDGES, the branches decided by the DAG module's own functions (`no_trigger`, `relabelled`,
/// `model_to_ship`) on the summaries, `/work` at `work`. The tasks run.
fn run_airflow_repair(
    v: &serde_json::Value,
    value: &dyn Fn(&str) -> String,
    work: &Path,
    summary: &Path,
) -> Vec<String> {
    let steps = v["STEPS"].as_object().unwrap();
    let common: Vec<String> = serde_json::from_value(v["COMMON"].clone()).unwrap();
    let mut summaries = serde_json::Map::new();
    let mut ran = Vec::new();
    let mut step = |name: &str, summaries: &mut serde_json::Map<String, serde_json::Value>| {
        let mut args: Vec<String> = steps[name]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| {
                let a = crate::util::fill_placeholders(a.as_str().unwrap(), &|k| {
                    k.strip_prefix("params.").map(value)
                });
                on_volume(&a, work, summary)
            })
            .collect();
        args.extend(common.iter().cloned());
        args.extend(["--summary".into(), summary.display().to_string()]);
        crate::util::btu(&args).success();
        let s = serde_json::from_slice(&std::fs::read(summary).unwrap()).unwrap();
        summaries.insert(name.to_string(), s);
        ran.push(name.to_string());
    };
    for name in ["detect", "verify", "unlearn", "verify_repaired"] {
        step(name, &mut summaries);
    }
    if airflow_decides("no_trigger", summaries.get("verify")) {
        step("relabel", &mut summaries);
        if airflow_decides("relabelled", summaries.get("relabel")) {
            step("tune", &mut summaries);
        }
    }
    let export = airflow_choice("model_to_ship", summaries.get("tune"));
    step(&export, &mut summaries);
    for name in ["eval_suspect", "eval_repaired"] {
        step(name, &mut summaries);
    }
    ran
}

/// The repair DAG module's decision function `f` on a task's summary (`None`: the task did not
/// run), called with plain python (the module imports without Airflow).
fn airflow_call(f: &str, summary: Option<&serde_json::Value>) -> serde_json::Value {
    let script = "import json,sys\nsys.path.insert(0,sys.argv[1])\nimport btu_repair_dag as m\nprint(json.dumps(getattr(m,sys.argv[2])(json.loads(sys.argv[3]))))";
    let o = std::process::Command::new("python3")
        .args(["-c", script])
        .arg(root().join("pipelines/airflow"))
        .arg(f)
        .arg(summary.unwrap_or(&serde_json::Value::Null).to_string())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

fn airflow_decides(f: &str, summary: Option<&serde_json::Value>) -> bool {
    airflow_call(f, summary).as_bool().unwrap()
}

fn airflow_choice(f: &str, summary: Option<&serde_json::Value>) -> String {
    airflow_call(f, summary).as_str().unwrap().to_string()
}

/// The repair flow's Argo template and Airflow DAG, run as their engines would (the DAG's
/// conditions decided on the steps' summaries, `/work` a directory of the test's), write what
/// `btu defend --suspect` writes, byte for byte, on both branches: a trigger verified and
/// repaired; nothing verified, the labels tested and the repaired model tuned on the rows
/// relabelled (the tuned model exported and evaluated).
#[test]
fn the_repair_workflows_write_what_defend_writes() {
    if !crate::util::have_ort("the repair workflows evaluate the ONNX export") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(root().join("pipelines/argo/btu-repair.yaml")).unwrap();
    let doc: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    let defaults = crate::util::argo_parameters(&doc["spec"]["arguments"]["parameters"]);
    let airflow = airflow_literals(&root().join("pipelines/airflow/btu_repair_dag.py"));
    let params = airflow["PARAMS"].as_object().unwrap();
    for branch in [Branch::Verified, Branch::Relabel] {
        let dir = d.path().join(format!("{branch:?}"));
        std::fs::create_dir_all(&dir).unwrap();
        // Argo.
        let value = |name: &str| {
            repair_params(name, branch).unwrap_or_else(|| {
                let default = defaults.iter().find(|(n, _)| n == name);
                default
                    .unwrap_or_else(|| panic!("no parameter {name}"))
                    .1
                    .clone()
            })
        };
        let run = dir.join("defend");
        defend_repair(&run, &value);
        let work = dir.join("argo-work");
        let ended = run_argo_repair(&doc, &value, &work, &dir.join("summary.json"));
        let tuned = branch == Branch::Relabel;
        let expect = |ran: bool| {
            if ran {
                Ended::Succeeded
            } else {
                Ended::Skipped
            }
        };
        assert_eq!(ended["relabel"], expect(tuned), "{branch:?}: {ended:?}");
        let tune = if tuned {
            Ended::Succeeded
        } else {
            Ended::Omitted
        };
        assert_eq!(ended["tune"], tune, "{branch:?}: {ended:?}");
        let shipped = if tuned {
            "export-tuned"
        } else {
            "export-repaired"
        };
        assert_eq!(ended[shipped], Ended::Succeeded, "{branch:?}: {ended:?}");
        assert_eq!(
            ended["eval-repaired"],
            Ended::Succeeded,
            "{branch:?}: {ended:?}"
        );
        assert_same_repair(&work, &run, branch, "Argo");

        // Airflow: the same, with the DAG's own parameters and decisions.
        let value = |name: &str| {
            repair_params(name, branch)
                .unwrap_or_else(|| params[&name.replace('-', "_")].as_str().unwrap().into())
        };
        let run = dir.join("defend-airflow");
        defend_repair(&run, &value);
        let work = dir.join("airflow-work");
        let ran = run_airflow_repair(&airflow, &value, &work, &dir.join("summary.json"));
        let shipped = if tuned {
            "export_tuned"
        } else {
            "export_repaired"
        };
        assert!(ran.iter().any(|t| t == shipped), "{branch:?}: {ran:?}");
        assert_eq!(
            ran.iter().any(|t| t == "tune"),
            tuned,
            "{branch:?}: {ran:?}"
        );
        assert_same_repair(&work, &run, branch, "Airflow");
    }
    let edges: Vec<(String, String)> = serde_json::from_value(airflow["EDGES"].clone()).unwrap();
    for (a, b) in [
        ("detect", "verify"),
        ("verify", "unlearn"),
        ("verify", "no_trigger"),
        ("no_trigger", "relabel"),
        ("relabelled", "tune"),
        ("tune", "choose_model"),
        ("choose_model", "export_tuned"),
        ("export_repaired", "eval_repaired"),
        ("export_tuned", "eval_repaired"),
        ("has_test", "eval_suspect"),
    ] {
        assert!(edges.contains(&(a.into(), b.into())), "no edge {a} -> {b}");
    }
}

/// A workflow argument with the work volume (`/work`) at `work` and Argo's summary file at
/// `summary`.
fn on_volume(arg: &str, work: &Path, summary: &Path) -> String {
    if arg == "/tmp/summary.json" {
        return summary.display().to_string();
    }
    match arg.strip_prefix("/work/") {
        Some(rest) => work.join(rest).display().to_string(),
        None => arg.to_string(),
    }
}

/// A DAG module's literals (STEPS, PARAMS, COMMON, EDGES), read with plain python.
fn airflow_literals(dag: &Path) -> serde_json::Value {
    let script = "import ast,json,sys\nt=ast.parse(open(sys.argv[1]).read())\nv={}\nfor n in t.body:\n  if isinstance(n,ast.Assign) and isinstance(n.targets[0],ast.Name) and n.targets[0].id in ('STEPS','PARAMS','COMMON','EDGES','DECISIONS'):\n    v[n.targets[0].id]=ast.literal_eval(n.value)\nprint(json.dumps(v))";
    let o = std::process::Command::new("python3")
        .args(["-c", script])
        .arg(dag)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}
