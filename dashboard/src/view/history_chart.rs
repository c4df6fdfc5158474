//! A shelter's evacuees (and capacity) over time, as inline SVG.
//!
//! Drawn by hand from [`crate::history::chart`]: a few dozen lines of SVG beat shipping a
//! charting library to every HQ browser.

use std::rc::Rc;

use yew::prelude::*;

use crate::history::{self, HEIGHT, HistoryError, Point, WIDTH};
use crate::i18n::{Label, Lang};

/// Where the history stands.
#[derive(Debug, Clone, PartialEq)]
pub enum HistoryState {
    Loading,
    Ready(Rc<Vec<Point>>),
    Failed(HistoryError),
}

#[derive(Debug, Properties, PartialEq)]
pub struct HistoryChartProps {
    pub lang: Lang,
    pub history: HistoryState,
}

/// Dots are drawn only while they stay legible; the line carries longer histories.
const MAX_DOTS: usize = 60;

#[component]
pub fn HistoryChart(props: &HistoryChartProps) -> Html {
    let lang = props.lang;
    let points = match &props.history {
        HistoryState::Loading => {
            return html! {
                <div id="history-chart" data-state="loading" data-points="0">
                    <p class="empty">{ Label::HistoryLoading.text(lang) }</p>
                </div>
            };
        }
        HistoryState::Failed(e) => {
            return html! {
                <div id="history-chart" data-state="error" data-points="0">
                    <p class="error" role="alert" title={e.to_string()}>{ Label::HistoryFailed.text(lang) }</p>
                </div>
            };
        }
        HistoryState::Ready(points) => points,
    };
    let Some(chart) = history::chart(points) else {
        return html! {
            <div id="history-chart" data-state="empty" data-points="0">
                <p class="empty">{ Label::HistoryEmpty.text(lang) }</p>
            </div>
        };
    };
    let (left, top, right, bottom) = history::plot_area();
    let plotted = chart.plotted();
    let title = format!("{}: {plotted}", Label::History.text(lang));
    html! {
        <div id="history-chart" data-state="ready" data-points={plotted.to_string()}>
            <svg
                viewBox={format!("0 0 {WIDTH} {HEIGHT}")}
                role="img"
                aria-label={title}
                preserveAspectRatio="xMidYMid meet"
            >
                { for chart.y_ticks.iter().map(|(y, label)| html! {
                    <g class="y-tick">
                        <line x1={left.to_string()} x2={right.to_string()} y1={y.to_string()} y2={y.to_string()} />
                        <text x={(left - 6.0).to_string()} y={(y + 4.0).to_string()} text-anchor="end">{ label }</text>
                    </g>
                }) }
                { for chart.x_ticks.iter().enumerate().map(|(i, (x, label))| {
                    // The end labels sit inside the plot's width rather than over its edge.
                    let anchor = match i {
                        _ if chart.x_ticks.len() == 1 => "middle",
                        0 => "start",
                        i if i + 1 == chart.x_ticks.len() => "end",
                        _ => "middle",
                    };
                    html! {
                        <text class="x-tick" x={x.to_string()} y={(bottom + 18.0).to_string()} text-anchor={anchor}>{ label }</text>
                    }
                }) }
                <line class="axis" x1={left.to_string()} x2={right.to_string()} y1={bottom.to_string()} y2={bottom.to_string()} />
                <line class="axis" x1={left.to_string()} x2={left.to_string()} y1={top.to_string()} y2={bottom.to_string()} />
                if !chart.capacity.is_empty() {
                    <polyline class="capacity" points={chart.capacity.clone()}>
                        <title>{ Label::Capacity.text(lang) }</title>
                    </polyline>
                }
                <polyline class="evacuees" points={chart.evacuees.clone()} />
                if plotted <= MAX_DOTS {
                    { for chart.dots.iter().map(|(x, y, v, at)| html! {
                        <circle class="evacuees" cx={x.to_string()} cy={y.to_string()} r="3">
                            <title>{ format!("{at}: {v}") }</title>
                        </circle>
                    }) }
                }
            </svg>
            <p class="legend">
                <span class="key evacuees">{ Label::EvacueeCount.text(lang) }</span>
                { " " }
                <span class="key capacity">{ Label::Capacity.text(lang) }</span>
                { " — " }{ lang.pick("時刻は日本時間", "times in JST") }
            </p>
        </div>
    }
}
