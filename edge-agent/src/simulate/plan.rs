//! Where the simulated sites are: N sites spread over the 23 wards in proportion to each
//! ward's designated shelters, each with its own random stream from one seed.

use std::time::Duration;

use rand::SeedableRng;
use rand::rngs::StdRng;
use renkei_shared::WARDS;

use super::{Scenario, SimSite};

/// Splits `total` seats over parties in proportion to `weights` by the largest-remainder
/// method; once `total` reaches the number of parties, every party gets at least one (taken
/// from the party most above its exact quota). Ties go to the larger weight, then the earlier.
pub fn apportion(total: usize, weights: &[u32]) -> Vec<usize> {
    if weights.is_empty() {
        return Vec::new();
    }
    let all_zero = weights.iter().all(|&w| w == 0);
    let w: Vec<u128> = weights
        .iter()
        .map(|&w| if all_zero { 1 } else { u128::from(w) })
        .collect();
    let sum: u128 = w.iter().sum();
    let n = total as u128;
    let mut seats: Vec<usize> = w.iter().map(|&wi| (n * wi / sum) as usize).collect();
    let given: usize = seats.iter().sum();
    let mut order: Vec<usize> = (0..w.len()).collect();
    order.sort_by(|&a, &b| {
        (n * w[b] % sum)
            .cmp(&(n * w[a] % sum))
            .then(w[b].cmp(&w[a]))
            .then(a.cmp(&b))
    });
    for &i in order.iter().take(total - given) {
        seats[i] += 1;
    }
    if total >= w.len() {
        // Surplus over the exact quota, in units of 1/sum.
        let surplus =
            |seats: &[usize], j: usize| seats[j] as i128 * sum as i128 - (n * w[j]) as i128;
        let mut empty: Vec<usize> = (0..w.len()).filter(|&i| seats[i] == 0).collect();
        empty.sort_by(|&a, &b| w[b].cmp(&w[a]).then(a.cmp(&b)));
        for i in empty {
            let donor = (0..w.len())
                .filter(|&j| seats[j] > 1)
                .max_by(|&a, &b| surplus(&seats, a).cmp(&surplus(&seats, b)).then(b.cmp(&a)));
            if let Some(d) = donor {
                seats[d] -= 1;
                seats[i] += 1;
            }
        }
    }
    seats
}

/// Sites spread over the wards, deterministic for a seed.
pub fn plan(sites: usize, seed: u64, interval: Duration) -> Vec<SimSite> {
    plan_scenario(sites, seed, interval, Scenario::Steady, 1.0, None)
}

/// Sites spread over the wards playing `scenario` at `speed` story steps per heartbeat,
/// deterministic for a seed.
pub fn plan_scenario(
    sites: usize,
    seed: u64,
    interval: Duration,
    scenario: Scenario,
    speed: f64,
    only_ward: Option<renkei_shared::WardCode>,
) -> Vec<SimSite> {
    // Spread by each ward's shelters, or all in one ward (a ward office's own sites).
    let per_ward: Vec<usize> = match only_ward {
        Some(only) => WARDS
            .iter()
            .map(|w| if w.code == only { sites } else { 0 })
            .collect(),
        None => {
            let weights: Vec<u32> = WARDS.iter().map(|w| w.shelters_2024).collect();
            apportion(sites, &weights)
        }
    };
    let mut out = Vec::with_capacity(sites);
    for (ward, &count) in WARDS.iter().zip(&per_ward) {
        for n in 1..=count {
            // One stream per site, so a site's story does not depend on the others.
            let stream = seed
                ^ u64::from(ward.code.0).wrapping_mul(0x9E37_79B9_7F4A_7C15)
                ^ (n as u64).wrapping_mul(0xD1B5_4A32_D192_ED03);
            let mut site = SimSite::new(ward, n, StdRng::seed_from_u64(stream), interval);
            site.speed = speed;
            if let Scenario::Earthquake { quake_at } = scenario {
                site.prepare_for_quake(Scenario::strike_beat(quake_at, interval));
            }
            out.push(site);
        }
    }
    out
}
