// Forwards one request into one booted VM and streams the answer back. The
// header rewriting is pure so that it can be tested without a VM.

import type { IncomingHttpHeaders } from 'node:http'
import { performance } from 'node:perf_hooks'
import { Transform, type Readable } from 'node:stream'
import type { FastifyReply, FastifyRequest } from 'fastify'
import { VmcgiError } from './errors.js'
import type { Exchange } from './http/exchange.js'
import type { Lease } from './lease.js'
import type { GuestVm } from './vm/guest.js'

// RFC 9110 §7.6.1: headers that describe one connection, not the message.
// Expect too: busybox httpd never answers 100 Continue, and the whole body is
// sent anyway.
const hopByHop = new Set([
  'connection', 'keep-alive', 'proxy-authenticate', 'proxy-authorization',
  'proxy-connection', 'te', 'trailer', 'transfer-encoding', 'upgrade', 'expect',
])

/**
 * Drops hop-by-hop headers, those the Connection header names, vmcgi-* (ours
 * alone to set), and any name with an underscore: CGI turns `-` and `_` alike
 * into `_`, so `X_Forwarded_For` would reach a script as vmcgi's
 * X-Forwarded-For (nginx drops them by default too).
 */
function withoutHopByHop(headers: IncomingHttpHeaders): IncomingHttpHeaders {
  const named = String(headers.connection ?? '').toLowerCase().split(',').map((name) => name.trim())
  const kept: IncomingHttpHeaders = {}
  for (const [name, value] of Object.entries(headers)) {
    const lower = name.toLowerCase()
    if (value === undefined || hopByHop.has(lower) || named.includes(lower) || lower.startsWith('vmcgi-') || lower.includes('_')) continue
    kept[lower] = value
  }
  return kept
}

export interface ClientInfo {
  ip: string
  proto: string
  host: string | undefined
}

export function toGuestHeaders(headers: IncomingHttpHeaders, client: ClientInfo): IncomingHttpHeaders {
  const out = withoutHopByHop(headers)
  const forwardedFor = headers['x-forwarded-for']
  out['x-forwarded-for'] = forwardedFor ? `${forwardedFor}, ${client.ip}` : client.ip
  out['x-forwarded-proto'] = client.proto
  if (client.host) out['x-forwarded-host'] = client.host
  else delete out['x-forwarded-host']
  return out
}

export function bootTimeHeader(vm: Pick<GuestVm, 'bootMs' | 'accelerated'>): string {
  return `${vm.bootMs} ms (hardware acceleration ${vm.accelerated ? 'enabled' : 'disabled'})`
}

/** Where one request's time went, in milliseconds. */
export interface RequestTiming {
  /** Waiting for admission (limits.maxVms). */
  queueMs: number
  /** Starting the QEMU process of this request's VM. */
  spawnMs: number
  /** The guest, from QEMU's start to its first HTTP answer. */
  bootMs: number
  /** How long this request waited for its VM: 0 when a warm one was ready. */
  waitMs: number
  /** From forwarding the request to the guest's response headers. */
  proxyMs: number
}

/** A W3C Server-Timing value; browsers' devtools show it in the network panel. */
export function serverTiming(timing: RequestTiming): string {
  const entries: Array<[string, number]> = [
    ['queue', timing.queueMs],
    ['spawn', timing.spawnMs],
    ['boot', timing.bootMs],
    ['wait', timing.waitMs],
    ['proxy', timing.proxyMs],
  ]
  return entries.map(([name, ms]) => `${name};dur=${Math.max(0, ms).toFixed(1)}`).join(', ')
}

export function toClientHeaders(
  headers: IncomingHttpHeaders,
  vm: Pick<GuestVm, 'id' | 'bootMs' | 'accelerated'>,
  timing?: RequestTiming,
): IncomingHttpHeaders {
  return {
    ...withoutHopByHop(headers),
    'vmcgi-status': 'OK',
    'vmcgi-vm-boot-time': bootTimeHeader(vm),
    'vmcgi-vm-id': vm.id,
    ...(timing ? { 'server-timing': serverTiming(timing) } : {}),
  }
}

/** Maps what reply-from/undici report about the guest onto the catalogue. */
export function guestFailure(error: Error & { code?: string }): VmcgiError {
  const cause = (error.cause ?? {}) as { code?: string; name?: string }
  if (cause.name === 'HTTPParserError' || error.name === 'HTTPParserError') {
    return new VmcgiError('GUEST_BAD_RESPONSE', 'the guest sent an invalid HTTP response', { cause: error })
  }
  const code = cause.code ?? error.code
  switch (code) {
    case 'UND_ERR_HEADERS_TIMEOUT':
    case 'FST_REPLY_FROM_TIMEOUT':
    case 'FST_REPLY_FROM_GATEWAY_TIMEOUT':
      return new VmcgiError('HEADERS_TIMEOUT', 'the guest sent no response headers in time', { cause: error })
    case 'UND_ERR_BODY_TIMEOUT':
      return new VmcgiError('BODY_TIMEOUT', 'the guest stopped sending its body', { cause: error })
    case 'FST_REPLY_FROM_BAD_GATEWAY':
    case 'HPE_INVALID_CONSTANT':
    case 'HPE_INVALID_STATUS':
    case 'HPE_HEADER_OVERFLOW':
    case 'UND_ERR_HEADERS_OVERFLOW':
      return new VmcgiError('GUEST_BAD_RESPONSE', 'the guest sent an invalid HTTP response', { cause: error })
    default:
      return new VmcgiError('GUEST_UNREACHABLE', `the guest dropped the connection (${code ?? error.message})`, { cause: error })
  }
}


/**
 * Streams the guest's answer back. Whatever goes wrong on the way is for the
 * exchange to explain: the request's own reason (timeout, client gone) when
 * there is one, or what the guest did.
 */
export function forwardToVm(
  request: FastifyRequest,
  reply: FastifyReply,
  exchange: Exchange,
  lease: Lease,
  { path, host }: { path: string; host: string | undefined },
): FastifyReply {
  const { vm } = lease
  vm.markServing()
  const forwarded = performance.now()
  /** Whether the guest's body ends with its connection, as CGI output without a length does. */
  let unframed = false
  // The path alone: reply-from then takes the query from the request as it came.
  return reply.from(path, {
    getUpstream: () => vm.origin,
    // A guest's own answer, a 503 included, goes back once. Only a connection
    // the guest dropped before answering is tried again (see resetRetryDelay).
    // (reply-from's types say `res` is always there; it is undefined when the connection failed.)
    retryDelay: ({ err, res, attempt }) => {
      if ((res as FastifyReply | undefined) !== undefined || !replayable(request)) return null
      const delay = resetRetryDelay(err, attempt, exchange.deadline)
      if (delay !== null) request.log.debug({ vm: vm.id, attempt: attempt + 1, delayMs: delay, err }, 'the guest dropped the connection before answering; sending the request again')
      return delay
    },
    rewriteRequestHeaders: (_request, headers) => toGuestHeaders(headers, { ip: request.ip, proto: request.protocol, host }),
    rewriteHeaders: (headers) => {
      unframed = closeDelimited(headers)
      return toClientHeaders(headers, vm, {
        queueMs: lease.queueMs,
        waitMs: lease.waitMs,
        spawnMs: vm.spawnMs,
        bootMs: vm.bootMs - vm.spawnMs,
        proxyMs: performance.now() - forwarded,
      })
    },
    // A connection that failed because QEMU died is the VM's exit, not the guest's doing.
    onError: (failed, { error }) => void vm.isRunning().then((running) => failed.send(running
      ? exchange.explain(error)
      : exchange.fail(new VmcgiError('VM_EXITED', 'QEMU exited before the guest answered', { cause: error })))),
    // A body that fails after the headers can only be cut; its reason is
    // recorded first, for the log line and the metrics.
    onResponse: (_request, replying, res) => {
      res.stream.once('error', (error: Error) => exchange.explain(error))
      replying.send(unframed ? confirmEnd(res.stream, vm, exchange) : res.stream)
    },
  })
}

/**
 * A small TCP stack (smoltcp's, say) has one listening socket and no backlog:
 * while it serves one connection, or waits out one that a readiness probe
 * opened and left, it resets the next. Such a reset, before any response
 * byte, is worth another try for up to about two seconds. Only a request
 * without a body is sent again: a streamed body cannot be replayed. The guest
 * is a throwaway VM that reaches no network, so what a replay does stays in it.
 */
const resetRetryDelaysMs = [25, 50, 100, 200, 400, 600, 625]

export function resetRetryDelay(error: (Error & { code?: string }) | undefined, attempt: number, deadline: number): number | null {
  const code = error?.code ?? (error?.cause as { code?: string } | undefined)?.code
  if (code !== 'UND_ERR_SOCKET' && code !== 'ECONNRESET') return null
  const delay = resetRetryDelaysMs[attempt]
  if (delay === undefined || performance.now() + delay >= deadline) return null
  return delay
}

function replayable(request: FastifyRequest): boolean {
  const length = request.headers['content-length']
  return request.headers['transfer-encoding'] === undefined && (length === undefined || length === '0')
}

/** A body with neither a length nor chunks ends when the guest's connection closes (RFC 9112 §6.3). */
export function closeDelimited(headers: IncomingHttpHeaders): boolean {
  const coding = String(headers['transfer-encoding'] ?? '').toLowerCase()
  return headers['content-length'] === undefined && !coding.includes('chunked')
}

/**
 * Passes a close-delimited body on, and lets it end only if QEMU is still
 * running when it does. When QEMU dies, user networking closes the guest's
 * connection as if the guest had ended its answer; ended cleanly, that body
 * would look complete to the client. It is cut instead.
 */
function confirmEnd(body: Readable, vm: GuestVm, exchange: Exchange): Readable {
  const confirmed = new Transform({
    transform: (chunk, _encoding, callback) => callback(null, chunk),
    flush: (callback) => {
      vm.isRunning().then((running) => {
        if (running) return callback()
        callback(exchange.fail(new VmcgiError('VM_EXITED', 'QEMU exited while the guest answered')))
      }, callback)
    },
  })
  body.once('error', (error) => confirmed.destroy(error))
  return body.pipe(confirmed)
}
