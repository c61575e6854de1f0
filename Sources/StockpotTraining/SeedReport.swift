import Foundation

/// The claims Stockpot is built on, measured on the real logs: one row per claim (what was claimed, what was
/// measured, its interval, whether the data supports it) and the plots, rendered as Markdown and as one
/// self-contained HTML page (inline SVG and CSS, no external resource). Written by `stockpot experiment seed`.
public struct SeedReport: Codable, Sendable {
    /// What the data says about a claim.
    public enum Verdict: String, Codable, Sendable {
        /// The interval lies on the claimed side (beyond the margin, when there is one).
        case supported
        /// The interval lies on the other side.
        case contradicted
        /// The interval straddles: this data cannot tell.
        case notShown = "not shown"

        /// The verdict for a measured difference whose claim is "larger than `margin`" (use a negative margin for
        /// "not worse than |margin|"): supported when the interval's low end clears it, contradicted when its high
        /// end is below it.
        public static func of(low: Double, high: Double, margin: Double = 0) -> Verdict {
            guard low.isFinite, high.isFinite else { return .notShown }
            if low > margin { return .supported }
            if high < margin { return .contradicted }
            return .notShown
        }
    }

    /// One claim: the technique, what it claims, what was measured, the interval, the verdict, a note.
    public struct Row: Codable, Sendable {
        /// The technique (`distillation`, `INT8`…).
        public var technique: String
        public var claim: String
        public var measured: String
        /// The 95 % interval, and over what it was drawn.
        public var interval: String
        public var verdict: Verdict
        /// Anything the reader needs to weigh the row (sample size, caveats).
        public var note: String

        public init(technique: String, claim: String, measured: String, interval: String, verdict: Verdict, note: String = "") {
            self.technique = technique
            self.claim = claim
            self.measured = measured
            self.interval = interval
            self.verdict = verdict
            self.note = note
        }
    }

    /// One figure: an inline SVG with its title and caption, also written beside the Markdown as `file`.
    public struct Plot: Codable, Sendable {
        /// File name beside the Markdown report (`fusion-front.svg`).
        public var file: String
        public var title: String
        /// A complete `<svg>` element.
        public var svg: String
        public var caption: String

        public init(file: String, title: String, svg: String, caption: String) {
            self.file = file
            self.title = title
            self.svg = svg
            self.caption = caption
        }
    }

    public var title: String
    /// Lines describing the data, split, seed and settings.
    public var setup: [String]
    public var rows: [Row]
    public var plots: [Plot]
    /// Wall-clock seconds of the run, and the command that produced it.
    public var seconds: Double
    public var command: String

    public init(title: String, setup: [String], rows: [Row], plots: [Plot], seconds: Double, command: String) {
        self.title = title
        self.setup = setup
        self.rows = rows
        self.plots = plots
        self.seconds = seconds
        self.command = command
    }

    static func minutes(_ s: Double) -> String { String(format: "%.1f min", s / 60) }

    /// The Markdown report; plots are referenced by their file names.
    public func markdown() -> String {
        func cell(_ s: String) -> String { s.replacingOccurrences(of: "|", with: "\\|").replacingOccurrences(of: "\n", with: " ") }
        var s = "# \(title)\n\n"
        s += setup.map { "- \($0)" }.joined(separator: "\n") + "\n"
        s += "- Produced by `\(command)` in \(Self.minutes(seconds)) on this machine.\n\n"
        let counts = Dictionary(rows.map { ($0.verdict, 1) }, uniquingKeysWith: +)
        s += "\(rows.count) claims: \(counts[.supported] ?? 0) supported, \(counts[.contradicted] ?? 0) contradicted, \(counts[.notShown] ?? 0) not shown by this data.\n\n"
        s += "| technique | claim | measured | 95 % interval | verdict | note |\n| --- | --- | --- | --- | --- | --- |\n"
        for r in rows {
            s += "| \(cell(r.technique)) | \(cell(r.claim)) | \(cell(r.measured)) | \(cell(r.interval)) | **\(r.verdict.rawValue)** | \(cell(r.note)) |\n"
        }
        for p in plots { s += "\n## \(p.title)\n\n![\(p.title)](\(p.file))\n\n\(p.caption)\n" }
        return s
    }

    /// One HTML page holding everything: the table, the plots inline, a small script that builds the contents
    /// and marks the page ready (`data-ready`, `data-plots` on `<body>`), which the browser test reads.
    public func html() -> String {
        func esc(_ s: String) -> String {
            s.replacingOccurrences(of: "&", with: "&amp;").replacingOccurrences(of: "<", with: "&lt;").replacingOccurrences(of: ">", with: "&gt;")
        }
        var s = """
        <!DOCTYPE html>
        <html lang="en">
        <head>
        <meta charset="utf-8">
        <meta name="viewport" content="width=device-width, initial-scale=1">
        <title>\(esc(title))</title>
        <style>
        body { font-family: sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em; color: #222; }
        table { border-collapse: collapse; width: 100%; font-size: 14px; }
        th, td { border: 1px solid #ccc; padding: 6px 8px; vertical-align: top; text-align: left; }
        th { background: #f3f3f3; }
        td.verdict { font-weight: bold; white-space: nowrap; }
        tr.supported td.verdict { color: #17692c; background: #e6f4ea; }
        tr.contradicted td.verdict { color: #a50e0e; background: #fce8e6; }
        tr.not-shown td.verdict { color: #6b5900; background: #fef7e0; }
        figure { margin: 2em 0; }
        figure svg { max-width: 100%; height: auto; border: 1px solid #eee; }
        figcaption { color: #555; font-size: 14px; margin-top: 0.5em; }
        nav ul { columns: 2; }
        </style>
        </head>
        <body>
        <h1>\(esc(title))</h1>
        <ul>

        """
        for line in setup { s += "<li>\(esc(line))</li>\n" }
        s += "<li>Produced by <code>\(esc(command))</code> in \(Self.minutes(seconds)).</li>\n</ul>\n<nav id=\"contents\"><h2>Contents</h2><ul></ul></nav>\n"
        s += "<h2 id=\"claims\">Claims</h2>\n<table>\n<thead><tr><th>technique</th><th>claim</th><th>measured</th><th>95 % interval</th><th>verdict</th><th>note</th></tr></thead>\n<tbody>\n"
        for r in rows {
            let cls = r.verdict.rawValue.replacingOccurrences(of: " ", with: "-")
            s += "<tr class=\"\(cls)\"><td>\(esc(r.technique))</td><td>\(esc(r.claim))</td><td>\(esc(r.measured))</td><td>\(esc(r.interval))</td>"
            s += "<td class=\"verdict\">\(esc(r.verdict.rawValue))</td><td>\(esc(r.note))</td></tr>\n"
        }
        s += "</tbody>\n</table>\n"
        for (i, p) in plots.enumerated() {
            s += "<figure class=\"plot\" id=\"plot-\(i)\">\n<h2>\(esc(p.title))</h2>\n\(Self.inline(p.svg))\n<figcaption>\(esc(p.caption))</figcaption>\n</figure>\n"
        }
        s += """
        <script>
        (function () {
          var list = document.querySelector('#contents ul');
          document.querySelectorAll('h2[id], figure.plot').forEach(function (el) {
            var heading = el.tagName === 'FIGURE' ? el.querySelector('h2') : el;
            var item = document.createElement('li');
            var link = document.createElement('a');
            link.href = '#' + el.id;
            link.textContent = heading.textContent;
            item.appendChild(link);
            list.appendChild(item);
          });
          var drawn = Array.prototype.filter.call(document.querySelectorAll('figure.plot svg'), function (svg) {
            var box = svg.getBoundingClientRect();
            return box.width > 0 && box.height > 0 && svg.querySelectorAll('circle, polyline, rect, line').length > 0;
          });
          document.body.setAttribute('data-plots', String(drawn.length));
          document.body.setAttribute('data-ready', '1');
        })();
        </script>
        </body>
        </html>

        """
        return s
    }

    /// An SVG document as an inline element: without an XML declaration.
    static func inline(_ svg: String) -> String {
        guard let start = svg.range(of: "<svg") else { return svg }
        return String(svg[start.lowerBound...])
    }
}
