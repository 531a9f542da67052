// buildServer: the routes, the per-request VM, and the one place where every
// failure becomes an HTTP status and a vmcgi-status reason. No listen() here,
// so that tests can inject() or listen on port 0.

import { METHODS, STATUS_CODES } from 'node:http'
import type { Socket } from 'node:net'
import { performance } from 'node:perf_hooks'
import { Readable } from 'node:stream'
import replyFrom from '@fastify/reply-from'
import Fastify, { LogController, type FastifyBaseLogger, type FastifyInstance, type FastifyReply, type FastifyRequest } from 'fastify'
import { Agent } from 'undici'
import type { Config } from './config.js'
import { Admission } from './admission.js'
import { Metrics } from './metrics.js'
import { VmPool } from './pool.js'
import { retryAfterSeconds, toVmcgiError, VmcgiError } from './errors.js'
import { forwardToVm, guestFailure } from './proxy.js'
import { warmUp } from './vm/readiness.js'
import type { GuestVm, VmFactory } from './vm/guest.js'

export interface ServerDeps {
  createVm: VmFactory
  /** Where counters and histograms go; a private registry by default. */
  metrics?: Metrics
  /** A pino logger; by default one is made at config.log.level. */
  logger?: FastifyBaseLogger
}

interface RequestState {
  vm: GuestVm | undefined
  failure: VmcgiError | undefined
  /** Set when a chunked body was read whole, to send it on with a Content-Length. */
  bodyLength?: number
  /** When timeouts.requestMs runs out for this request (performance.now() time). */
  deadline: number
}

declare module 'fastify' {
  interface FastifyRequest {
    vmcgi: RequestState
  }
  interface FastifyInstance {
    /** Kills every VM now; requests in flight on them fail. */
    destroyAllVms(): Promise<void>
    admission: Admission
    pool: VmPool
  }
}

export async function buildServer(config: Config, deps: ServerDeps): Promise<FastifyInstance> {
  const app = Fastify({
    ...(deps.logger ? { loggerInstance: deps.logger } : { logger: { level: config.log.level } }),
    // One log line per request, written when its response closes (below).
    logController: new LogController({ disableRequestLogging: true }),
    requestIdHeader: 'x-request-id',
    // timeouts.requestMs bounds a request; Node's own timer would answer without vmcgi-status.
    requestTimeout: 0,
    // Answered below, with vmcgi-status and Retry-After.
    return503OnClosing: false,
    clientErrorHandler: answerClientError,
  }) as unknown as FastifyInstance
  // Every method Node can parse goes to the guest (WebDAV's PROPFIND, say),
  // except CONNECT: vmcgi is no tunnel.
  for (const method of METHODS) {
    if (method !== 'CONNECT' && !app.supportedMethods.includes(method)) app.addHttpMethod(method, { hasBody: true })
  }

  // One Agent for all VMs: each VM is a new origin, and undici (≥ 7.15) drops
  // the origin's pool once its sockets close, which they do when the VM dies.
  const agent = new Agent({
    headersTimeout: config.timeouts.headersMs,
    bodyTimeout: config.timeouts.bodyIdleMs,
    keepAliveTimeout: 1_000,
    connect: { timeout: config.timeouts.headersMs },
  })
  await app.register(replyFrom, { undici: agent, disableCache: true, disableRequestLogging: true })

  const admission = new Admission({
    maxVms: config.limits.maxVms,
    queueSize: config.limits.queue.size,
    maxWaitMs: config.limits.queue.maxWaitMs,
  })
  const metrics = deps.metrics ?? new Metrics()
  const pool = new VmPool(config.pool.size, deps.createVm, app.log, {
    onBooted: (vm) => metrics.observeBoot(vm.bootMs, vm.accelerated),
    warmUp: (vm) => warmUp({
      host: '127.0.0.1',
      port: Number(new URL(vm.origin).port),
      path: config.readiness.path,
      count: config.pool.warmUpRequests,
      timeoutMs: config.readiness.attemptTimeoutMs * 10,
    }),
  })
  /** VMs serving a request; the pool owns the others. */
  const live = new Set<GuestVm>()
  metrics.watch({ booting: () => pool.booting, pooled: () => pool.ready, serving: () => live.size, queued: () => admission.queued })
  app.decorate('admission', admission)
  app.decorate('pool', pool)
  app.decorate('destroyAllVms', async () => {
    await Promise.all([pool.destroy(), ...[...live].map((vm) => vm.destroy(new VmcgiError('SHUTTING_DOWN', 'vmcgi is shutting down')))])
  })
  app.addHook('onReady', async () => pool.start())
  let closing = false
  app.addHook('preClose', async () => {
    closing = true
  })
  app.addHook('onClose', async () => {
    await app.destroyAllVms()
    await agent.close()
  })

  // A body with a Content-Length goes to the guest as it arrives: nothing is
  // parsed or buffered. One without (chunked) is read up to the limit first,
  // because a CGI script needs CONTENT_LENGTH (RFC 3875 §4.1.2) and busybox
  // httpd drops a chunked body.
  // Each chunked body read may hold limits.bodyLimitBytes of memory, and the
  // reading comes before admission: no more of them at once than admission
  // lets requests run or wait.
  let buffering = 0
  const maxBuffering = config.limits.maxVms + config.limits.queue.size
  app.removeAllContentTypeParsers()
  app.addContentTypeParser('*', (request, payload, done) => {
    if (request.headers['content-length'] !== undefined) return done(null, payload)
    if (buffering >= maxBuffering) {
      return done(new VmcgiError('OVERLOADED', `${buffering} chunked request bodies are being read already`))
    }
    buffering++
    readUpTo(payload, config.limits.bodyLimitBytes, request.vmcgi.deadline - performance.now())
      .finally(() => buffering--)
      .then((body) => {
        request.vmcgi.bodyLength = body.length
        done(null, Readable.from([body]))
      }, (error: unknown) => done(error as Error))
  })

  app.decorateRequest('vmcgi', null as unknown as RequestState)
  app.addHook('onRequest', async (request, reply) => {
    request.vmcgi = { vm: undefined, failure: undefined, deadline: performance.now() + config.timeouts.requestMs }
    // 'close' comes for every response, complete, cut or abandoned: one log line each.
    reply.raw.once('close', () => {
      // vmcgi records why before it cuts a response; otherwise the client left.
      if (!reply.raw.writableFinished) request.vmcgi.failure ??= new VmcgiError('CLIENT_GONE', 'the client went away')
      const { failure } = request.vmcgi
      const statusCode = !reply.raw.headersSent && failure ? failure.statusCode : reply.statusCode
      logRequest(request, reply, statusCode)
      // A response cut after its headers said OK counts under its failure.
      metrics.countRequest(String(failure?.status ?? reply.getHeader('vmcgi-status') ?? 'none'), statusCode)
    })
    if (closing) {
      reply.header('connection', 'close')
      throw new VmcgiError('SHUTTING_DOWN', 'vmcgi is shutting down')
    }
  })
  app.addHook('onSend', async (_request, reply) => {
    if (closing) reply.header('connection', 'close')
  })

  app.get(config.health.path, async (_request, reply) => {
    reply.header('vmcgi-status', 'OK').type('text/plain; charset=utf-8')
    return 'OK\n'
  })

  app.all('/*', async (request, reply) => {
    const declared = Number(request.headers['content-length'] ?? 0)
    if (declared > config.limits.bodyLimitBytes) {
      throw new VmcgiError('BODY_TOO_LARGE', `the body is over ${config.limits.bodyLimitBytes} bytes`)
    }

    // Aborted when the client goes or the request runs out of time; the
    // reason says which, and every wait below ends with it.
    const ended = new AbortController()
    const timer = setTimeout(
      () => ended.abort(new VmcgiError('REQUEST_TIMEOUT', `the request took over ${config.timeouts.requestMs} ms`)),
      Math.max(0, request.vmcgi.deadline - performance.now()),
    )
    reply.raw.once('close', () => {
      clearTimeout(timer)
      ended.abort(new VmcgiError('CLIENT_GONE', 'the client went away'))
    })
    // After the headers a failure can only cut the response: cut it before the
    // VM dies, or a guest body that ends with its connection would look complete.
    const cut = (failure: VmcgiError) => {
      if (!reply.raw.headersSent || reply.raw.writableFinished) return
      request.vmcgi.failure ??= failure
      reply.raw.destroy()
    }
    ended.signal.addEventListener('abort', () => cut(ended.signal.reason))

    const queued = performance.now()
    const release = await admission.acquire(ended.signal)
    const queueMs = performance.now() - queued
    let taken
    try {
      taken = await pool.take(request.log, ended.signal)
    } catch (error) {
      release()
      throw error
    }
    const { vm, waitMs } = taken
    request.vmcgi.vm = vm
    live.add(vm)
    const stop = () => {
      void vm.close().finally(() => {
        live.delete(vm)
        release()
      })
    }
    // Either way the request ends, the VM dies with it.
    ended.signal.addEventListener('abort', stop, { once: true })
    if (ended.signal.aborted) stop()
    void vm.exited.then(() => cut(new VmcgiError('VM_EXITED', 'QEMU exited while the guest answered')))
    const explain = (error: Error & { code?: string }) =>
      ended.signal.aborted ? ended.signal.reason : request.vmcgi.failure ?? guestFailure(error)
    return forwardToVm(request, reply, vm, { queueMs, waitMs }, explain)
  })

  app.setNotFoundHandler((_request, _reply) => {
    throw new VmcgiError('BAD_REQUEST', 'vmcgi serves paths that start with /', { statusCode: 400 })
  })

  // An error of the guest's response body comes here from Fastify's stream
  // handling as it is, but its reason was recorded first (src/proxy.ts);
  // before the body's first byte it can still be answered.
  app.setErrorHandler((error, request, reply) => {
    const recorded = error instanceof VmcgiError ? undefined : request.vmcgi?.failure
    sendFailure(request, reply, recorded ?? toVmcgiError(error))
  })

  return app
}

function logRequest(request: FastifyRequest, reply: FastifyReply, statusCode: number): void {
  const { vm, failure } = request.vmcgi
  request.log.info({
    method: request.method,
    url: request.url,
    statusCode,
    vmcgiStatus: reply.getHeader('vmcgi-status'),
    complete: reply.raw.writableFinished,
    vm: vm?.id,
    bootMs: vm?.bootMs || undefined,
    ms: Math.round(reply.elapsedTime),
    failure: failure?.code,
  }, 'request')
}

/** The one place where a failure becomes an HTTP answer. */
function sendFailure(request: FastifyRequest, reply: FastifyReply, failure: VmcgiError): void {
  request.vmcgi ??= { vm: undefined, failure: undefined, deadline: performance.now() }
  request.vmcgi.failure ??= failure
  const vm = request.vmcgi.vm
  const level = failure.statusCode >= 500 && failure.code !== 'OVERLOADED' ? 'warn' : 'info'
  request.log[level]({ err: failure, vm: vm?.id, console: vm?.consoleTail() || undefined }, failure.message)
  if (reply.sent || reply.raw.headersSent || reply.raw.destroyed) {
    // Mid-body: nothing honest can be added, so the client sees the stream cut.
    reply.raw.destroy()
    return
  }
  // Headers put in place for the guest's answer (its body failed before its
  // first byte) belong to that answer, not to this one.
  for (const name of reply.raw.getHeaderNames()) reply.raw.removeHeader(name)
  for (const name of Object.keys(reply.getHeaders())) reply.removeHeader(name)
  const retryAfter = retryAfterSeconds[failure.code]
  if (retryAfter !== undefined) reply.header('retry-after', String(retryAfter))
  // The rest of a refused body is not worth reading: close once the answer is out.
  if (!request.raw.complete) reply.header('connection', 'close')
  const message = failure.code === 'INTERNAL' ? 'internal error' : failure.message
  reply
    .code(failure.statusCode)
    .header('vmcgi-status', failure.status)
    .type('text/plain; charset=utf-8')
    .send(`vmcgi: ${failure.status}: ${message}\n`)
}

/**
 * Reads a whole body, failing with BODY_TOO_LARGE once it grows past `limit`
 * bytes, or with CLIENT_TIMEOUT when it takes over `timeoutMs`. The stream is
 * left paused, not destroyed, so that the answer still reaches the client;
 * Node closes the connection after it.
 */
function readUpTo(body: Readable, limit: number, timeoutMs: number): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = []
    let length = 0
    const fail = (error: VmcgiError) => {
      clearTimeout(timer)
      body.off('data', onData).pause()
      reject(error)
    }
    const timer = setTimeout(() => fail(new VmcgiError('CLIENT_TIMEOUT', `the request body took over ${timeoutMs} ms to arrive`)), timeoutMs)
    const onData = (chunk: Buffer) => {
      length += chunk.length
      if (length <= limit) return void chunks.push(chunk)
      fail(new VmcgiError('BODY_TOO_LARGE', `the body is over ${limit} bytes`))
    }
    body.on('data', onData)
    body.once('end', () => {
      clearTimeout(timer)
      resolve(Buffer.concat(chunks))
    })
    body.once('error', (error) => {
      clearTimeout(timer)
      reject(error)
    })
  })
}

/**
 * Requests Node cannot parse (a broken request line, headers over its limit)
 * never reach a route; they are answered here, on the socket.
 */
function answerClientError(error: Error & { code?: string }, socket: Socket): void {
  // Mid-response (a broken request pipelined behind one being answered) there
  // is no room for an answer: hang up.
  const answering = (socket as Socket & { _httpMessage?: { headersSent?: boolean } })._httpMessage?.headersSent
  if (!socket.writable || answering) return void socket.destroy()
  const { statusCode, status } = error.code === 'ERR_HTTP_REQUEST_TIMEOUT'
    ? new VmcgiError('CLIENT_TIMEOUT', 'the request headers did not arrive in time')
    : new VmcgiError('BAD_REQUEST', 'the request could not be parsed', { statusCode: error.code === 'HPE_HEADER_OVERFLOW' ? 431 : 400 })
  const body = `vmcgi: ${status}: ${STATUS_CODES[statusCode]}\n`
  socket.end([
    `HTTP/1.1 ${statusCode} ${STATUS_CODES[statusCode]}`,
    `vmcgi-status: ${status}`,
    'content-type: text/plain; charset=utf-8',
    `content-length: ${Buffer.byteLength(body)}`,
    'connection: close',
    '',
    body,
  ].join('\r\n'))
}
