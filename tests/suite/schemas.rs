//! `schemas/*.schema.json` are generated from the code that writes each table; this fails when
//! the committed files drift. Regenerate with `cargo run --release -- schemas --out schemas`.

use std::path::Path;

#[test]
fn committed_schemas_match_the_code() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas");
    let tables = btu::io::tables::all_schemas();
    assert!(!tables.is_empty());
    for (name, schema, keys) in tables {
        let expected = btu::io::tables::schema_json(name, &schema, &keys);
        let p = dir.join(format!("{name}.schema.json"));
        let text = std::fs::read_to_string(&p)
            .unwrap_or_else(|_| panic!("{} missing; run `btu schemas --out schemas`", p.display()));
        let committed: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            committed,
            expected,
            "{} drifted from the code; run `btu schemas --out schemas`",
            p.display()
        );
    }
}

#[test]
fn written_tables_carry_the_committed_schema() {
    let meta = btu::io::tables::TableMeta {
        command: "test".into(),
        params: serde_json::json!({"b": 1, "a": [2, {"d": 3, "c": 4}]}),
        model_sha256: "00".into(),
        corpus_fingerprint: None,
        extra: vec![],
    };
    let b = btu::io::tables::token_scores_batch(&[], &meta).unwrap();
    let fields: Vec<String> = b
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    assert_eq!(
        fields,
        ["round", "token_id", "token", "special", "distance", "rank", "selected"]
    );
    // Parameters are canonical JSON: sorted keys at every level.
    assert_eq!(
        b.schema().metadata()["btu:params"],
        r#"{"a":[2,{"c":4,"d":3}],"b":1}"#
    );
}
