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
