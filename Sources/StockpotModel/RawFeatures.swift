/// Resolves a field's raw text value from the pieces a ranking request carries — the user's id and features,
/// the request context, one candidate's id and features — the same way training reads the logs. Used by the
/// serving layers and by training on serving logs, so both see identical inputs.
public struct RawFeatures {
    public var userId: Int64
    public var user: [String: String]
    public var context: [String: String]

    public init(userId: Int64, user: [String: String], context: [String: String]) {
        self.userId = userId
        self.user = user
        self.context = context
    }

    /// The value for `source` of the candidate `itemId`, whose features are read through `item`.
    public func value(_ source: FieldSource, itemId: Int64, item: (String) -> String?) -> String {
        switch source {
        case .log("user_id"): return String(userId)
        case .log("video_id"): return String(itemId)
        case .log(let name): return context[name] ?? ""
        case .user(let name): return user[name] ?? ""
        case .video(let name): return item(name) ?? ""
        case .hour: return DerivedFeatures.hour(hourmin: context["hourmin"] ?? "")
        case .videoAgeDays: return DerivedFeatures.videoAgeDays(date: context["date"] ?? "", uploadDate: item("upload_dt") ?? "")
        }
    }

    /// True when the value is the same for every candidate (user, context, derived hour).
    public static func isRequestLevel(_ source: FieldSource) -> Bool {
        switch source {
        case .log("video_id"), .video, .videoAgeDays: return false
        default: return true
        }
    }
}
