//! The OpenAPI document's structure, as a client reads it: every response described,
//! every problem a route can answer declared with an example of each of its codes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;

use http_actix::openapi::{document_json, problems};
use http_actix::problem::Code;
use serde_json::Value;

fn document() -> Value {
    serde_json::from_str(&document_json().unwrap()).unwrap()
}

/// `(path, method, operation)` of every operation.
fn operations(doc: &Value) -> Vec<(String, String, Value)> {
    let mut all = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            all.push((path.clone(), method.clone(), operation.clone()));
        }
    }
    all
}

/// Every response object of the document: under each operation and in components.
fn responses(doc: &Value) -> Vec<(String, Value)> {
    let mut all = Vec::new();
    for (path, method, operation) in operations(doc) {
        for (status, response) in operation["responses"].as_object().unwrap() {
            all.push((format!("{method} {path} {status}"), response.clone()));
        }
    }
    if let Some(shared) = doc["components"]["responses"].as_object() {
        for (name, response) in shared {
            all.push((format!("components {name}"), response.clone()));
        }
    }
    all
}

#[test]
fn every_response_has_a_description() {
    let doc = document();
    let all = responses(&doc);
    assert!(all.len() > 50, "{}", all.len());
    for (at, response) in all {
        let description = response["description"].as_str().unwrap_or_default();
        assert!(!description.trim().is_empty(), "{at} has no description");
    }
}

#[test]
fn every_api_operation_declares_its_problems() {
    let doc = document();
    let mut seen = 0;
    for (path, method, operation) in operations(&doc) {
        if !path.starts_with("/api/") {
            continue;
        }
        seen += 1;
        let id = operation["operationId"].as_str().unwrap();
        let has_body = method == "post";
        let codes = problems(id, has_body)
            .unwrap_or_else(|| panic!("{method} {path}: operation {id} is not in the table"));
        let declared = operation["responses"].as_object().unwrap();
        let mut wanted: BTreeSet<String> = ["400", "401", "500", "503"]
            .into_iter()
            .map(str::to_owned)
            .collect();
        if has_body {
            wanted.extend(["408", "413", "415"].map(str::to_owned));
        }
        if id == "create_user" {
            wanted.insert("403".to_owned());
        }
        wanted.extend(codes.iter().map(|c| c.status().to_string()));
        for status in &wanted {
            assert!(
                declared.contains_key(status),
                "{method} {path} lacks {status}"
            );
        }
        // Each problem response: examples named by code, each of its own code and status,
        // and every code of the table among them.
        let mut listed = BTreeSet::new();
        for (status, response) in declared {
            if !status.starts_with('4') && !status.starts_with('5') {
                continue;
            }
            let examples = response["content"]["application/problem+json"]["examples"]
                .as_object()
                .unwrap_or_else(|| panic!("{method} {path} {status}: no examples"));
            assert!(!examples.is_empty(), "{method} {path} {status}");
            for (name, example) in examples {
                let value = &example["value"];
                assert_eq!(value["code"], name.as_str(), "{method} {path} {status}");
                assert_eq!(
                    value["status"].to_string(),
                    *status,
                    "{method} {path} {name}"
                );
                assert!(
                    response["description"].as_str().unwrap().contains(name),
                    "{method} {path} {status}: the description does not name {name}"
                );
                listed.insert(name.clone());
            }
        }
        let table: BTreeSet<String> = codes.iter().map(|c| c.as_str().to_owned()).collect();
        assert_eq!(listed, table, "{method} {path}");
        // A read carries no key: its 503 does not tell the client to reuse one.
        let unavailable = &declared["503"]["content"]["application/problem+json"]["examples"]["SERVICE_UNAVAILABLE"]
            ["value"]["detail"];
        let keyed = codes.contains(&Code::IdempotencyKeyRequired);
        assert_eq!(
            unavailable.as_str().unwrap().contains("idempotency key"),
            keyed,
            "{method} {path}: {unavailable}"
        );
    }
    assert_eq!(seen, 17, "every /api operation");
}

#[test]
fn the_examples_are_not_all_the_same() {
    let doc = document();
    let mut codes = BTreeSet::new();
    for (_, response) in responses(&doc) {
        let Some(content) = response["content"]["application/problem+json"].as_object() else {
            continue;
        };
        assert!(
            content.get("example").is_none(),
            "one example for several codes"
        );
        for (name, _) in content["examples"].as_object().unwrap() {
            codes.insert(name.clone());
        }
    }
    let all: BTreeSet<String> = Code::ALL.iter().map(|c| c.as_str().to_owned()).collect();
    assert_eq!(codes, all, "every code has an example somewhere");
}

#[test]
fn keyed_operations_declare_replays_and_retryable_ones_retry_after() {
    let doc = document();
    for (path, method, operation) in operations(&doc) {
        let id = operation["operationId"].as_str().unwrap();
        let responses = operation["responses"].as_object().unwrap();
        for (status, response) in responses {
            assert!(
                response["headers"].get("X-Request-Id").is_some(),
                "{method} {path} {status}: no X-Request-Id"
            );
        }
        if ["charge", "use_balance", "pay", "refund"].contains(&id) {
            for status in ["200", "422"] {
                for name in ["Idempotent-Replayed", "Idempotency-Expires"] {
                    assert!(
                        responses[status]["headers"].get(name).is_some(),
                        "{method} {path} {status} {name}"
                    );
                }
            }
            assert!(responses["409"]["headers"].get("Retry-After").is_some());
        }
        if path.starts_with("/api/") {
            assert!(responses["503"]["headers"].get("Retry-After").is_some());
            assert!(
                responses["401"]["headers"]
                    .get("WWW-Authenticate")
                    .is_some()
            );
        }
    }
}
