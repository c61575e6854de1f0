import Foundation
import Synchronization
import Testing
@testable import StockpotTraining

/// The headless browser the report page is checked in (`chromium` from Debian; `scripts/install-deps` installs it).
private let chromium: String? = ["/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome"].first {
    FileManager.default.isExecutableFile(atPath: $0)
}

/// Opens `page` in headless chromium: the DOM after its scripts ran, and every console message it logged.
private func openInBrowser(_ page: URL) throws -> (dom: String, console: [String]) {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: chromium!)
    p.arguments = ["--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0", "--window-size=1280,2000",
                   "--user-data-dir=\(page.deletingLastPathComponent().appendingPathComponent("profile").path)", "--dump-dom", page.absoluteString]
    let out = Pipe(), err = Pipe()
    p.standardOutput = out
    p.standardError = err
    try p.run()
    // Read both pipes while it runs (a full pipe would stall it).
    let errData = Mutex(Data())
    let reader = Thread { errData.withLock { $0 = err.fileHandleForReading.readDataToEndOfFile() } }
    reader.start()
    let dom = String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
    p.waitUntilExit()
    while reader.isExecuting { usleep(10_000) }
    let log = errData.withLock { String(decoding: $0, as: UTF8.self) }
    return (dom, log.split(separator: "\n").filter { $0.contains("CONSOLE") }.map(String.init))
}

/// `openInBrowser` on a thread of its own: it waits seconds for chromium, and a wait on the test run's shared
/// threads would starve the in-process gRPC tests that run beside it.
private func openInBrowserOffThePool(_ page: URL) async throws -> (dom: String, console: [String]) {
    try await withCheckedThrowingContinuation { c in
        Thread { c.resume(with: Result { try openInBrowser(page) }) }.start()
    }
}

@Suite struct SeedReportTests {
    func sample() -> SeedReport {
        let svg = { (shape: String) in "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"300\" height=\"200\">\(shape)</svg>" }
        return SeedReport(
            title: "Claims <measured> & checked", setup: ["KuaiRand-Pure, test 20220505..20220508"],
            rows: [
                .init(technique: "INT8", claim: "costs < 0.001 AUC", measured: "−0.0002", interval: "[−0.0004, 0.0000]", verdict: .supported),
                .init(technique: "corrector", claim: "beats legacy on the tail", measured: "−0.0006", interval: "[−0.0030, 0.0018]", verdict: .notShown,
                      note: "10,419 tail impressions | 3 days"),
            ],
            plots: [.init(file: "a.svg", title: "Curve", svg: "<?xml version=\"1.0\"?>\n" + svg("<polyline points=\"0,0 10,10\" stroke=\"black\"/>"), caption: "a curve"),
                    .init(file: "b.svg", title: "Front", svg: svg("<circle cx=\"5\" cy=\"5\" r=\"3\"/>"), caption: "a front")],
            seconds: 95, command: "stockpot experiment seed --quick")
    }

    @Test func verdictsFollowTheInterval() {
        #expect(SeedReport.Verdict.of(low: 0.001, high: 0.004) == .supported)
        #expect(SeedReport.Verdict.of(low: -0.004, high: -0.001) == .contradicted)
        #expect(SeedReport.Verdict.of(low: -0.001, high: 0.002) == .notShown)
        // Non-inferiority: "not worse than 0.002".
        #expect(SeedReport.Verdict.of(low: -0.0015, high: 0.001, margin: -0.002) == .supported)
        #expect(SeedReport.Verdict.of(low: .nan, high: 1) == .notShown)
    }

    @Test func markdownHasEveryRowEscapedAndEveryPlot() {
        let md = sample().markdown()
        #expect(md.contains("2 claims: 1 supported, 0 contradicted, 1 not shown"))
        #expect(md.contains("10,419 tail impressions \\| 3 days"))
        #expect(md.contains("![Curve](a.svg)") && md.contains("![Front](b.svg)"))
    }

    @Test(.enabled(if: chromium != nil, "chromium is not installed (scripts/install-deps installs it): the report page is not opened in a browser"))
    func thePageRendersInAHeadlessBrowserWithItsPlotsAndNoConsoleMessages() async throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("seed-report-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let page = dir.appendingPathComponent("report.html")
        try Data(sample().html().utf8).write(to: page)
        let (dom, console) = try await openInBrowserOffThePool(page)
        #expect(dom.contains("data-ready=\"1\""), "the page's script did not finish")
        #expect(dom.contains("data-plots=\"2\""), "both plots laid out with a size and drawn shapes")
        #expect(dom.contains("Claims &lt;measured&gt; &amp; checked"))
        #expect(dom.contains("<a href=\"#plot-1\">Front</a>"), "the contents list was built")
        #expect(console.isEmpty, "console: \(console)")
        // The check can fail: a page with a script error is caught.
        let broken = dir.appendingPathComponent("broken.html")
        try Data(sample().html().replacingOccurrences(of: "var list = ", with: "missingFunction(); var list = ").utf8).write(to: broken)
        let (brokenDOM, brokenConsole) = try await openInBrowserOffThePool(broken)
        #expect(!brokenDOM.contains("data-ready=\"1\""))
        #expect(brokenConsole.contains { $0.contains("missingFunction") })
    }
}
