//! Hash routing: `#/` is the overview, `#/ward/131041` one ward's view, `#/site/131041/{site}`
//! one site's view. The hash keeps a view bookmarkable and the back button working without a
//! server-side router.

use renkei_shared::{Id, SiteRef, WardCode};

/// The page shown.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Route {
    #[default]
    Overview,
    Ward(WardCode),
    Site(SiteRef),
}

impl Route {
    /// Parses `location.hash`; anything unknown is the overview.
    pub fn parse(hash: &str) -> Route {
        let path = hash.trim_start_matches('#').trim_start_matches('/');
        match path.split('/').collect::<Vec<_>>()[..] {
            ["ward", code] => code
                .parse::<WardCode>()
                .map_or(Route::Overview, Route::Ward),
            ["site", code, site] => match (code.parse::<WardCode>(), Id::new(site)) {
                (Ok(ward), Ok(site)) => Route::Site(SiteRef { ward, site }),
                _ => Route::Overview,
            },
            _ => Route::Overview,
        }
    }

    /// The hash that shows this route.
    pub fn hash(&self) -> String {
        match self {
            Route::Overview => "#/".into(),
            Route::Ward(code) => format!("#/ward/{code}"),
            Route::Site(site) => format!("#/site/{}/{}", site.ward, site.site),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_builds_hashes() {
        assert_eq!(Route::parse(""), Route::Overview);
        assert_eq!(Route::parse("#/"), Route::Overview);
        assert_eq!(Route::parse("#/ward/131041"), Route::Ward(WardCode(131041)));
        // The five-digit form is common on paper; it names the same ward.
        assert_eq!(Route::parse("#/ward/13104"), Route::Ward(WardCode(131041)));
        assert_eq!(Route::parse("#/ward/999999"), Route::Overview);
        assert_eq!(Route::parse("#/nowhere"), Route::Overview);
        assert_eq!(Route::Ward(WardCode(131041)).hash(), "#/ward/131041");
        assert_eq!(
            Route::parse(&Route::Ward(WardCode(131016)).hash()),
            Route::Ward(WardCode(131016))
        );
    }

    #[test]
    fn a_site_route_names_its_ward_and_site() {
        let site = SiteRef {
            ward: WardCode(131041),
            site: Id::new("nishi-shinjuku-es").unwrap(),
        };
        let route = Route::Site(site.clone());
        assert_eq!(route.hash(), "#/site/131041/nishi-shinjuku-es");
        assert_eq!(Route::parse(&route.hash()), route);
        assert_eq!(Route::parse("#/site/13104/nishi-shinjuku-es"), route);
        assert_eq!(Route::parse("#/site/131041/bad site"), Route::Overview);
        assert_eq!(Route::parse("#/site/999999/x"), Route::Overview);
    }
}
