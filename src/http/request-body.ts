// The request body. One with a Content-Length goes to the guest as it arrives:
// nothing is parsed or buffered. One without (chunked) is read whole first, up
// to the limit and within the request's deadline, because a CGI script needs
// CONTENT_LENGTH (RFC 3875 §4.1.2) and busybox httpd drops a chunked body.

import { Readable } from 'node:stream'
import fp from 'fastify-plugin'
import { VmcgiError } from '../errors.js'

export interface RequestBodyOptions {
  limitBytes: number
  /**
   * How many chunked bodies may be read at once. Each may hold limitBytes of
   * memory, and the reading comes before admission: no more of them than
   * admission lets requests run or wait.
   */
  maxReading: number
}

export const requestBody = fp<RequestBodyOptions>(async (app, { limitBytes, maxReading }) => {
  let reading = 0
  app.removeAllContentTypeParsers()
  app.addContentTypeParser('*', (request, payload, done) => {
    if (request.headers['content-length'] !== undefined) return done(null, payload)
    if (reading >= maxReading) {
      return done(new VmcgiError('OVERLOADED', `${reading} chunked request bodies are being read already`))
    }
    reading++
    request.exchange!.readBody((signal) => readUpTo(payload, limitBytes, signal))
      .finally(() => reading--)
      .then((body) => {
        // From here on the body has a length, and the guest is told it.
        request.headers['content-length'] = String(body.length)
        done(null, Readable.from([body]))
      }, (error: unknown) => done(error as Error))
  })
}, { name: 'vmcgi-request-body', dependencies: ['vmcgi-exchange'] })

/**
 * Reads a whole body, failing with BODY_TOO_LARGE once it grows past `limit`
 * bytes, or with the signal's reason. The stream is left paused, not
 * destroyed, so that the answer still reaches the client; Node closes the
 * connection after it.
 */
export function readUpTo(body: Readable, limit: number, signal: AbortSignal): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = []
    let length = 0
    const settle = () => {
      signal.removeEventListener('abort', onAbort)
      body.off('data', onData)
    }
    const fail = (error: unknown) => {
      settle()
      body.pause()
      reject(error)
    }
    const onAbort = () => fail(signal.reason)
    const onData = (chunk: Buffer) => {
      length += chunk.length
      if (length <= limit) return void chunks.push(chunk)
      fail(new VmcgiError('BODY_TOO_LARGE', `the body is over ${limit} bytes`))
    }
    if (signal.aborted) return onAbort()
    signal.addEventListener('abort', onAbort, { once: true })
    body.on('data', onData)
    body.once('end', () => {
      settle()
      resolve(Buffer.concat(chunks))
    })
    body.once('error', fail)
  })
}
