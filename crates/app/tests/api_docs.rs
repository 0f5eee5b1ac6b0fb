//! docs/api.md against what the service is: every route of the OpenAPI document, every
//! error code and every setting appear in it; every relative link of the repository's
//! markdown leads to a file of the repository; `/` leads a browser to the Swagger UI.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[macro_use]
mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use clap::CommandFactory;
use common::{Backend, TestApp};
use http_actix::problem::Code;
use reqwest::StatusCode;
use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

fn api_md() -> String {
    std::fs::read_to_string(repo().join("docs/api.md")).unwrap()
}

fn openapi() -> Value {
    serde_json::from_str(&http_actix::openapi::document_json().unwrap()).unwrap()
}

/// What of `wanted` the text lacks, each looked for as written (in backticks when `code`).
fn missing(text: &str, wanted: impl IntoIterator<Item = String>, code: bool) -> Vec<String> {
    wanted
        .into_iter()
        .filter(|w| {
            let needle = if code { format!("`{w}`") } else { w.clone() };
            !text.contains(&needle)
        })
        .collect()
}

/// `METHOD /path` of every operation of the document.
fn routes(doc: &Value) -> Vec<String> {
    let mut routes = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            routes.push(format!("{} {path}", method.to_ascii_uppercase()));
        }
    }
    routes
}

/// The environment variable of every argument of the binary and its subcommands.
fn settings() -> BTreeSet<String> {
    fn walk(command: &clap::Command, into: &mut BTreeSet<String>) {
        for arg in command.get_arguments() {
            if let Some(env) = arg.get_env() {
                into.insert(env.to_string_lossy().into_owned());
            }
        }
        for sub in command.get_subcommands() {
            walk(sub, into);
        }
    }
    let mut all = BTreeSet::new();
    walk(&app::Cli::command(), &mut all);
    all
}

#[test]
fn every_route_of_the_openapi_document_is_in_the_reference() {
    let routes = routes(&openapi());
    assert!(routes.len() >= 12, "{routes:?}");
    let lacking = missing(&api_md(), routes, false);
    assert!(lacking.is_empty(), "docs/api.md lacks {lacking:?}");
}

#[test]
fn every_error_code_is_in_the_reference_and_the_openapi_document() {
    let codes: Vec<String> = Code::ALL.iter().map(|c| c.as_str().to_owned()).collect();
    let lacking = missing(&api_md(), codes.clone(), true);
    assert!(lacking.is_empty(), "docs/api.md lacks {lacking:?}");
    let document = openapi().to_string();
    let lacking: Vec<_> = codes
        .iter()
        .filter(|c| !document.contains(&format!("\"{c}\"")))
        .collect();
    assert!(lacking.is_empty(), "the OpenAPI document lacks {lacking:?}");
}

#[test]
fn every_setting_is_in_the_reference() {
    let settings = settings();
    assert!(
        settings.contains("LOCK_WAIT_MS") && settings.len() > 20,
        "{settings:?}"
    );
    let lacking = missing(&api_md(), settings, true);
    assert!(lacking.is_empty(), "docs/api.md lacks {lacking:?}");
}

#[test]
fn every_header_of_the_openapi_document_is_in_the_reference() {
    let doc = openapi();
    let mut headers = BTreeSet::new();
    for item in doc["paths"].as_object().unwrap().values() {
        for operation in item.as_object().unwrap().values() {
            for parameter in operation["parameters"].as_array().into_iter().flatten() {
                if parameter["in"] == "header" {
                    headers.insert(parameter["name"].as_str().unwrap().to_owned());
                }
            }
            for response in operation["responses"].as_object().unwrap().values() {
                if let Some(names) = response["headers"].as_object() {
                    headers.extend(names.keys().cloned());
                }
            }
        }
    }
    for response in doc["components"]["responses"].as_object().unwrap().values() {
        if let Some(names) = response["headers"].as_object() {
            headers.extend(names.keys().cloned());
        }
    }
    headers.insert("Authorization".to_owned());
    assert!(headers.len() >= 8, "{headers:?}");
    let lacking = missing(&api_md(), headers, true);
    assert!(lacking.is_empty(), "docs/api.md lacks {lacking:?}");
}

/// The markdown files a reader of the repository follows links in.
fn markdown_files() -> Vec<PathBuf> {
    let root = repo();
    let mut files = vec![root.join("README.md")];
    for dir in ["docs", "k6"] {
        let mut stack = vec![root.join(dir)];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    stack.push(path);
                } else if path.extension().is_some_and(|e| e == "md") {
                    files.push(path);
                }
            }
        }
    }
    files
}

/// The targets of the inline links `[text](target)` of a markdown text, outside code.
fn link_targets(text: &str) -> Vec<String> {
    let mut targets = Vec::new();
    let mut in_fence = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            in_fence = !in_fence;
            continue;
        }
        if in_fence {
            continue;
        }
        // Inline code spans may hold `](` that is not a link.
        let prose: String = line.split('`').step_by(2).collect::<Vec<_>>().join(" ");
        let mut rest = prose.as_str();
        while let Some(at) = rest.find("](") {
            rest = &rest[at + 2..];
            let Some(end) = rest.find(')') else { break };
            let target = rest[..end].split_whitespace().next().unwrap_or_default();
            targets.push(target.to_owned());
            rest = &rest[end..];
        }
    }
    targets
}

#[test]
fn every_relative_link_leads_to_a_file_of_the_repository() {
    let root = repo();
    let files = markdown_files();
    assert!(files.len() >= 8, "{files:?}");
    let mut broken = Vec::new();
    let mut checked = 0;
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for target in link_targets(&text) {
            if target.contains("://") || target.starts_with("mailto:") || target.starts_with('#') {
                continue;
            }
            checked += 1;
            let path = target.split('#').next().unwrap();
            let resolved = file.parent().unwrap().join(path).canonicalize();
            match resolved {
                Ok(resolved) if resolved.starts_with(&root) => {}
                _ => broken.push(format!(
                    "{}: {target}",
                    file.strip_prefix(&root).unwrap().display()
                )),
            }
        }
    }
    assert!(checked >= 10, "only {checked} links found");
    assert!(
        broken.is_empty(),
        "links outside the repository or to nothing: {broken:#?}"
    );
}

#[test]
fn links_are_found_and_judged() {
    let targets = link_targets(
        "see [a](docs/a.md#x) and [b](../shared/b.md), `[c](not-a-link)`\n```\n[d](no)\n```\n",
    );
    assert_eq!(targets, ["docs/a.md#x", "../shared/b.md"]);
}

async fn the_root_leads_a_browser_to_the_swagger_ui(backend: Backend) {
    let Some(app) = TestApp::spawn(backend).await else {
        return;
    };
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let res = client.get(app.url("/")).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::TEMPORARY_REDIRECT);
    assert_eq!(res.headers()["location"], "/swagger-ui/");
    // Followed, it is the UI.
    let ui = app.get("/").await;
    assert_eq!(ui.status(), StatusCode::OK);
    assert!(ui.text().await.unwrap().contains("swagger-ui"));
    // What `balance-service openapi` prints is what the service serves.
    let served: Value = app
        .get("/api-docs/openapi.json")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(served, openapi());
    app.stop().await;
}

on_both_backends!(the_root_leads_a_browser_to_the_swagger_ui);
