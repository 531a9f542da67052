// The request body, read so that a slow client cannot hold a VM. A body of up
// to limits.bodyBufferBytes, and any chunked one (up to limits.bodyLimitBytes),
// is read whole before the request asks for a VM, then sent with a
// Content-Length: a CGI script needs CONTENT_LENGTH (RFC 3875 §4.1.2) and
// busybox httpd drops a chunked body. A larger body streams into the VM as it
// arrives. Either way the client's body has its own idle and total timeouts,
// and running out of them is the client's fault (408 client-timeout).

import type { IncomingMessage, ServerResponse } from 'node:http'
import { performance } from 'node:perf_hooks'
import { Transform, type Readable } from 'node:stream'
import fp from 'fastify-plugin'
import { VmcgiError } from '../errors.js'
import { SpooledBody, SpoolFolder } from './body-spool.js'
import type { Exchange } from './exchange.js'

export interface RequestBodyOptions {
  limitBytes: number
  bufferBytes: number
  idleMs: number
  /** From the request's arrival to the body's last byte. */
  totalMs: number
  /**
   * How many bytes the bodies being read may hold at once, counting each
   * chunked one at limitBytes, since its size is not known until its end.
   */
  budgetBytes: number
}

export const requestBody = fp<RequestBodyOptions>(async (app, options) => {
  const { limitBytes, bufferBytes, budgetBytes } = options
  // Node would send `100 Continue` to every request that asks; one whose body
  // will be refused gets its refusal instead.
  app.server.on('checkContinue', (request: IncomingMessage, response: ServerResponse) => {
    if (Number(request.headers['content-length'] ?? 0) <= limitBytes) response.writeContinue()
    app.server.emit('request', request, response)
  })

  let held = 0
  const spool = new SpoolFolder()
  app.addHook('onClose', async () => spool.removeAll())
  app.removeAllContentTypeParsers()
  app.addContentTypeParser('*', (request, payload, done) => {
    const exchange = request.exchange!
    const coding = request.headers['transfer-encoding']
    if (coding !== undefined && coding.trim().toLowerCase() !== 'chunked') {
      // RFC 9112 §6.1: a coding vmcgi does not know cannot be passed on as it is.
      return done(new VmcgiError('NOT_IMPLEMENTED', `transfer coding "${coding}" is not supported`))
    }
    const declared = request.headers['content-length']
    if (Number(declared ?? 0) > limitBytes) return done(new VmcgiError('BODY_TOO_LARGE', `the body is over ${limitBytes} bytes`))
    if (Number(declared ?? 0) > bufferBytes) return done(null, watchBody(payload, exchange, options))
    const claim = declared === undefined ? limitBytes : Number(declared)
    if (held + claim > budgetBytes) {
      return done(new VmcgiError('OVERLOADED', `the request bodies being read hold ${held} bytes already`))
    }
    held += claim
    const totalMs = exchange.arrived + options.totalMs - performance.now()
    // Past bufferBytes, a chunked body goes to a file: memory holds bufferBytes a body at most.
    const body = new SpooledBody(bufferBytes, spool)
    exchange.onClosed(() => body.dispose())
    exchange.readBody((signal) => readUpTo(payload, body, { limitBytes, idleMs: options.idleMs, totalMs, signal }))
      .finally(() => (held -= claim))
      .then(async () => {
        // From here on the body has a length, and the guest is told it.
        request.headers['content-length'] = String(body.length)
        done(null, await body.open())
      })
      .catch((error: unknown) => done(error as Error))
  })
}, { name: 'vmcgi-request-body', dependencies: ['vmcgi-exchange'] })

const clientTimeout = (message: string) => new VmcgiError('CLIENT_TIMEOUT', message)

/**
 * Reads a whole body into `into`, failing with BODY_TOO_LARGE once it grows
 * past `limitBytes`, with CLIENT_TIMEOUT when it is silent for `idleMs` or not
 * in within `totalMs`, or with the signal's reason. The stream is left paused,
 * not destroyed, so that the answer still reaches the client; Node closes the
 * connection after it.
 */
export function readUpTo(body: Readable, into: SpooledBody, { limitBytes, idleMs, totalMs, signal }: {
  limitBytes: number
  idleMs: number
  totalMs: number
  signal: AbortSignal
}): Promise<void> {
  return new Promise((resolve, reject) => {
    let length = 0
    let failed = false
    let writing = Promise.resolve()
    const settle = () => {
      clearTimeout(idle)
      clearTimeout(total)
      signal.removeEventListener('abort', onAbort)
      body.off('data', onData)
    }
    const fail = (error: unknown) => {
      if (failed) return
      failed = true
      settle()
      body.pause()
      reject(error)
    }
    const onAbort = () => fail(signal.reason)
    const onData = (chunk: Buffer) => {
      idle.refresh()
      length += chunk.length
      if (length > limitBytes) return fail(new VmcgiError('BODY_TOO_LARGE', `the body is over ${limitBytes} bytes`))
      // One write at a time; the client waits while the disk does.
      body.pause()
      writing = writing.then(() => into.append(chunk)).then(() => void (failed || body.resume()), fail)
    }
    const idle = setTimeout(() => fail(clientTimeout(`the request body was silent for ${idleMs} ms`)), idleMs)
    const total = setTimeout(() => fail(clientTimeout(`the request body did not arrive within ${totalMs} ms`)), Math.max(0, totalMs))
    if (signal.aborted) return onAbort()
    signal.addEventListener('abort', onAbort, { once: true })
    body.on('data', onData)
    body.once('end', () => {
      settle()
      void writing.then(() => failed || resolve(), fail)
    })
    body.once('error', fail)
  })
}

/**
 * Passes a streamed body on, and ends the request with CLIENT_TIMEOUT when the
 * client is silent for `idleMs` or not done within `totalMs` of its arrival.
 * Silence while the VM is not reading what was sent is the VM's, not the client's.
 */
function watchBody(payload: Readable, exchange: Exchange, { idleMs, totalMs }: { idleMs: number; totalMs: number }): Readable {
  const watched = new Transform({
    transform(chunk, _encoding, callback) {
      idle.refresh()
      callback(null, chunk)
    },
  })
  const idle = setTimeout(() => {
    if (watched.readableLength >= watched.readableHighWaterMark) return void idle.refresh()
    exchange.abort(clientTimeout(`the request body was silent for ${idleMs} ms`))
  }, idleMs)
  const total = setTimeout(
    () => exchange.abort(clientTimeout(`the request body did not arrive within ${totalMs} ms`)),
    Math.max(0, exchange.arrived + totalMs - performance.now()),
  )
  const stop = () => {
    clearTimeout(idle)
    clearTimeout(total)
  }
  payload.once('end', stop)
  payload.once('close', stop)
  watched.once('close', stop)
  payload.once('error', (error) => watched.destroy(error))
  return payload.pipe(watched)
}
