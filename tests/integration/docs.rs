//! Tidy checks: the README documents every configuration key and every route.

use courier::config::keys;

fn readme() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).expect("README.md")
}

#[test]
fn readme_documents_every_config_key() {
    let readme = readme();
    let table: Vec<&str> = readme
        .lines()
        .skip_while(|l| !l.starts_with("## Configuration"))
        .take_while(|l| !l.starts_with("## The storage engine"))
        .filter(|l| l.starts_with("| `"))
        .collect();
    for key in keys() {
        assert!(
            table
                .iter()
                .any(|row| row.contains(&format!("`{}`", key.name))),
            "the README's configuration table lacks `{}`",
            key.name
        );
    }
}

#[test]
fn readme_shows_every_route() {
    let readme = readme();
    let routes = crate::support::api_routes();
    for route in routes {
        // `{agent}` is written with an example id in the README, or a route as itself.
        let pattern = route.replace("{agent}", "planner");
        let shown = readme.contains(&pattern) || readme.contains(&route);
        assert!(
            shown,
            "the README does not show {route} (looked for {pattern})"
        );
    }
}

/// `GET /openapi.json` documents exactly the routes and methods the server answers: each
/// (route, method) is tried on a real server, and one that is routed (anything but 405) must
/// be in the document, and one that is not must not be.
#[test]
fn the_openapi_document_has_every_route_and_method_the_server_answers() {
    let server = crate::support::TestServer::start(&[]);
    let response = server.get("/openapi.json");
    assert_eq!(response.status, 200);
    assert_eq!(response.header("content-type"), Some("application/json"));
    let doc = response.json;
    assert_eq!(doc["openapi"], "3.1.0");
    let routes = crate::support::api_routes();
    for route in &routes {
        let path = route
            .replace("{agent}", "alice")
            .replace("{name}", "work")
            .replace("{pattern}", "news.eu");
        for method in ["GET", "PUT", "POST", "DELETE", "PATCH"] {
            let routed = server.request(method, &path, None).status != 405;
            let operation = &doc["paths"][route.as_str()][method.to_lowercase()];
            assert_eq!(
                routed,
                operation.is_object(),
                "{method} {route}: answered by the server {routed}, in the document {}",
                operation.is_object()
            );
            let Some(responses) = operation["responses"].as_object() else {
                continue;
            };
            // Every error is documented in the error shape, and 500 everywhere.
            assert!(responses.contains_key("500"), "{method} {route} lacks 500");
            for (status, response) in responses {
                if status.starts_with('4') || status.starts_with('5') {
                    let schema = &response["content"]["application/json"]["schema"]["$ref"];
                    assert_eq!(
                        schema, "#/components/schemas/ErrorBody",
                        "{method} {route} {status}"
                    );
                }
            }
        }
    }
    let documented: Vec<&String> = doc["paths"].as_object().unwrap().keys().collect();
    for path in documented {
        assert!(routes.contains(path), "{path} is documented but not routed");
    }
}
