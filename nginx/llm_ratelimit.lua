-- llm-ratelimit for Nginx (lua-nginx-module, Debian 12's libnginx-mod-http-lua).
--
-- The same wiring as envoy/envoy.yaml, in four Nginx phases (nginx/nginx.conf calls them):
--   access  `access()`:        the client's request, body included, goes to the limiter's
--                              POST /v1/check (a subrequest to `location /_llm_ratelimit/check`);
--                              a denial is answered exactly as the limiter wrote it, an
--                              admission puts `x-llm-ratelimit-key` on the upstream request.
--   header  `header_filter()`: the admission's `x-ratelimit-*` headers reach the client.
--   body    `body_filter()`:   a copy of the response (JSON, or the SSE text) is kept; the
--                              client's chunks pass on untouched as they arrive.
--   log     `log()`:           after the response, a timer POSTs that copy to the limiter's
--                              /v1/report (a cosocket: the log phase may not do network I/O
--                              itself), which settles the reservation once.
-- Nothing here ever logs or forwards anywhere a header's value but the key's *name*.

local _M = {}

-- The most response bytes kept for settlement; a longer response is not reported and its
-- reservation stands (counted at admission: the safe side). Overridden by
-- `set $llm_ratelimit_report_max_bytes N;`.
local DEFAULT_REPORT_MAX_BYTES = 8 * 1024 * 1024
local REPORT_TIMEOUT_MS = 5000

-- The limiter's answer headers that are the client's business; hop-by-hop and framing
-- headers are Nginx's own.
local HOP_BY_HOP = {
    ["connection"] = true,
    ["keep-alive"] = true,
    ["transfer-encoding"] = true,
    ["content-length"] = true,
    ["date"] = true,
    ["server"] = true,
    ["x-llm-ratelimit-reservation"] = true,
    ["x-llm-ratelimit-key"] = true,
}

-- RFC 3986 unreserved: decoding their escapes never changes what a path names.
local function is_unreserved(b)
    return (b >= 48 and b <= 57) or (b >= 65 and b <= 90) or (b >= 97 and b <= 122)
        or b == 45 or b == 46 or b == 95 or b == 126
end

-- The path as the limiter meters it (src/openai/endpoint.rs `normalise`): query dropped,
-- escapes of unreserved characters decoded (others kept, upper-cased; a stray `%` written
-- `%25`), `\` read as `/`, empty and `.` segments dropped, `..` removing the one before.
-- nil for an encoded `/` or `\`, which the limiter refuses with 400.
function _M.normalise(target)
    local path = target:match("^[^?#]*")
    local out, i, n = {}, 1, #path
    while i <= n do
        local c = path:sub(i, i)
        if c == "%" then
            local hex = path:sub(i + 1, i + 2)
            local b = #hex == 2 and hex:match("^%x%x$") and tonumber(hex, 16)
            if b == 47 or b == 92 then
                return nil
            elseif b and is_unreserved(b) then
                out[#out + 1] = string.char(b)
                i = i + 3
            elseif b then
                out[#out + 1] = "%" .. hex:upper()
                i = i + 3
            else
                out[#out + 1] = "%25"
                i = i + 1
            end
        else
            local j = path:find("%", i, true) or (n + 1)
            out[#out + 1] = path:sub(i, j - 1)
            i = j
        end
    end
    local decoded = table.concat(out):gsub("\\", "/")
    local segments = {}
    for segment in decoded:gmatch("[^/]+") do
        if segment == ".." then
            segments[#segments] = nil
        elseif segment ~= "." then
            segments[#segments + 1] = segment
        end
    end
    return "/" .. table.concat(segments, "/")
end

-- Answers the client with `status`, `headers` and `body` and ends the request.
local function answer(status, headers, body)
    ngx.status = status
    for name, value in pairs(headers) do
        if not HOP_BY_HOP[name:lower()] then
            ngx.header[name] = value
        end
    end
    ngx.header["content-length"] = #body
    ngx.print(body)
    return ngx.exit(ngx.HTTP_OK)
end

local ENCODED_SEPARATOR = [[{"error":{"code":null,"message":"Invalid URL: the path contains ]]
    .. [[an encoded '/' or '\\' (%2F or %5C), which is not allowed.","param":null,]]
    .. [["type":"invalid_request_error"}}]]

local UNAVAILABLE = '{"error":{"message":"The rate limiter is unavailable. Please try again.",'
    .. '"type":"server_error","param":null,"code":null}}'

-- access_by_lua: admission.
function _M.access()
    local normal = _M.normalise(ngx.var.request_uri)
    if not normal then
        -- An encoded `/` or `\` would change which endpoint the path names: refused with
        -- the limiter's own 400, before anyone sees it (as Envoy does).
        return answer(400, { ["content-type"] = "application/json" }, ENCODED_SEPARATOR)
    end
    -- The limiter meters x-original-uri; the upstream gets the same path and query
    -- (proxy_pass ...$llm_ratelimit_uri).
    local args = ngx.var.args
    local metered = args and (normal .. "?" .. args) or normal
    ngx.var.llm_ratelimit_uri = metered
    ngx.req.read_body()
    -- The subrequest carries the client's body as read (memory or temp file, not copied);
    -- its location passes only these headers on (nginx/nginx.conf).
    ngx.req.set_header("x-original-uri", metered)
    ngx.req.set_header("x-original-method", ngx.req.get_method())
    local res = ngx.location.capture("/_llm_ratelimit/check", {
        method = ngx.HTTP_POST,
        always_forward_body = true,
    })
    ngx.req.clear_header("x-original-uri")
    ngx.req.clear_header("x-original-method")

    if res.truncated or res.status == ngx.HTTP_BAD_GATEWAY or res.status == ngx.HTTP_GATEWAY_TIMEOUT then
        -- Nginx's own answer: the limiter did not answer (it never sends 502 or 504).
        ngx.log(ngx.ERR, "llm_ratelimit: the limiter did not answer /v1/check (status ", res.status, ")")
        return answer(503, { ["content-type"] = "application/json", ["retry-after"] = "1" }, UNAVAILABLE)
    end
    if res.status ~= ngx.HTTP_OK then
        return answer(res.status, res.header, res.body or "")
    end

    local key = res.header["x-llm-ratelimit-key"]
    local ctx = ngx.ctx
    ctx.llm_headers = {}
    for name, value in pairs(res.header) do
        local lower = name:lower()
        if lower:sub(1, 12) == "x-ratelimit-" then
            ctx.llm_headers[lower] = value
        end
    end
    ctx.llm_reservation = res.header["x-llm-ratelimit-reservation"]
    if type(key) == "string" then
        ngx.var.llm_ratelimit_key = key
        ngx.req.set_header("x-llm-ratelimit-key", key)
    else
        -- Never let a client name a key itself.
        ngx.req.clear_header("x-llm-ratelimit-key")
    end
    if ctx.llm_reservation then
        ctx.llm_body = {}
        ctx.llm_size = 0
        ctx.llm_max = tonumber(ngx.var.llm_ratelimit_report_max_bytes) or DEFAULT_REPORT_MAX_BYTES
    end
end

-- header_filter_by_lua: the admission's x-ratelimit-* headers on the client's response.
function _M.header_filter()
    local headers = ngx.ctx.llm_headers
    if headers then
        for name, value in pairs(headers) do
            ngx.header[name] = value
        end
    end
end

-- body_filter_by_lua: a copy of what the upstream answered, for settlement. The chunk
-- itself passes on unchanged (proxy_buffering off: as soon as it arrives).
function _M.body_filter()
    local ctx = ngx.ctx
    local body = ctx.llm_body
    if not body then
        return
    end
    local chunk = ngx.arg[1]
    if chunk and #chunk > 0 then
        ctx.llm_size = ctx.llm_size + #chunk
        if ctx.llm_size > ctx.llm_max then
            ctx.llm_body = nil
            ngx.log(ngx.WARN, "llm_ratelimit: response over ", ctx.llm_max,
                " bytes; not reported, the reservation stands")
            return
        end
        body[#body + 1] = chunk
    end
end

-- Reads one HTTP/1.1 response's status and skips its body (Content-Length or chunked).
local function read_response(sock)
    local line, err = sock:receive("*l")
    if not line then
        return nil, err
    end
    local status = tonumber(line:match("^HTTP/1%.%d (%d%d%d)"))
    local length, chunked, close = 0, false, false
    while true do
        local header
        header, err = sock:receive("*l")
        if not header then
            return nil, err
        end
        if header == "" then
            break
        end
        local name, value = header:match("^([^:]+):%s*(.-)%s*$")
        name = name and name:lower()
        if name == "content-length" then
            length = tonumber(value) or 0
        elseif name == "transfer-encoding" and value:lower():find("chunked", 1, true) then
            chunked = true
        elseif name == "connection" and value:lower() == "close" then
            close = true
        end
    end
    if chunked then
        repeat
            local size_line
            size_line, err = sock:receive("*l")
            if not size_line then
                return nil, err
            end
            local size = tonumber(size_line:match("^%x+"), 16) or 0
            local _, e = sock:receive(size + 2)
            if e then
                return nil, e
            end
        until size == 0
    elseif length > 0 then
        local _, e = sock:receive(length)
        if e then
            return nil, e
        end
    end
    return status, close
end

-- The client's W3C trace context, passed on to /v1/report as nginx.conf passes it to
-- /v1/check: the settlement's span joins the client's trace. A value that is not a plain
-- header value of sane length (the `traceparent` format is the limiter's to judge) is
-- left out, so it can never break the report's request.
local TRACE_HEADERS = { "traceparent", "tracestate" }
local TRACE_MAX_BYTES = 512

local function trace_context()
    local trace = {}
    for _, name in ipairs(TRACE_HEADERS) do
        local value = ngx.var["http_" .. name]
        if type(value) == "string" and value ~= "" and #value <= TRACE_MAX_BYTES
            and not value:find("[^\32-\126]") then
            trace[name] = value
        end
    end
    return trace
end

-- The timer: POST /v1/report over a pooled connection.
-- A timer run early because the worker is shutting down gracefully (`premature`: a quit or
-- a reload) still reports: cosockets work there, and the worker waits for it.
local function report(_premature, host, port, reservation, upstream_status, body, trace)
    local sock = ngx.socket.tcp()
    sock:settimeouts(REPORT_TIMEOUT_MS, REPORT_TIMEOUT_MS, REPORT_TIMEOUT_MS)
    local ok, err = sock:connect(host, port)
    if not ok then
        ngx.log(ngx.ERR, "llm_ratelimit: /v1/report: connect: ", err)
        return
    end
    local request = {
        "POST /v1/report HTTP/1.1\r\nhost: ", host, ":", tostring(port),
        "\r\ncontent-type: application/octet-stream\r\ncontent-length: ", tostring(#body),
        "\r\nx-llm-ratelimit-reservation: ", reservation,
    }
    if upstream_status then
        request[#request + 1] = "\r\nx-upstream-status: " .. upstream_status
    end
    for _, name in ipairs(TRACE_HEADERS) do
        if trace[name] then
            request[#request + 1] = "\r\n" .. name .. ": " .. trace[name]
        end
    end
    request[#request + 1] = "\r\n\r\n"
    request[#request + 1] = body
    ok, err = sock:send(request)
    if not ok then
        ngx.log(ngx.ERR, "llm_ratelimit: /v1/report: send: ", err)
        sock:close()
        return
    end
    local status, close_or_err = read_response(sock)
    if not status then
        ngx.log(ngx.ERR, "llm_ratelimit: /v1/report: ", close_or_err)
        sock:close()
        return
    end
    if status ~= 200 then
        ngx.log(ngx.ERR, "llm_ratelimit: /v1/report answered ", status)
    end
    if close_or_err then
        sock:close()
    else
        sock:setkeepalive(60000, 64)
    end
end

-- log_by_lua: settlement, after the client has its response (or has gone).
function _M.log()
    local ctx = ngx.ctx
    local reservation = ctx.llm_reservation
    if not reservation or not ctx.llm_body then
        return
    end
    -- The last upstream's status ("502, 200" after a retry). Nginx records its own 502 or
    -- 504 when it could not reach one or gave up waiting (a 504 after proxy_read_timeout
    -- may follow output the upstream still generated: released, so uncounted); none is
    -- recorded when the client went away before
    -- the upstream answered (499): the upstream may have generated and billed output by
    -- then, so the report carries no status, not an upstream error, and the reservation
    -- stands (releasing it would let a client hang up on large generations uncounted).
    local upstream_status = (ngx.var.upstream_status or ""):match("(%d%d%d)%s*$")
    local addr = ngx.var.llm_ratelimit_report_addr or "127.0.0.1:10200"
    local host, port = addr:match("^(.+):(%d+)$")
    local ok, err = ngx.timer.at(0, report, host, tonumber(port), reservation, upstream_status,
        table.concat(ctx.llm_body), trace_context())
    if not ok then
        ngx.log(ngx.ERR, "llm_ratelimit: no timer for /v1/report: ", err)
    end
end

return _M
