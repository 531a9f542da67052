// Where a failure becomes an HTTP answer: one rendering of its status line,
// headers and body, sent through Fastify (sendFailure) or, for requests that
// never reach Fastify (unparseable, or CONNECT), on the raw socket.

import { STATUS_CODES, type IncomingMessage } from 'node:http'
import type { Socket } from 'node:net'
import type { Duplex } from 'node:stream'
import type { FastifyBaseLogger, FastifyReply, FastifyRequest } from 'fastify'
import fp from 'fastify-plugin'
import { retryAfterSeconds, toVmcgiError, VmcgiError } from '../errors.js'

export interface RenderedFailure {
  statusCode: number
  headers: Record<string, string>
  body: string
}

export function renderFailure(failure: VmcgiError): RenderedFailure {
  const retryAfter = retryAfterSeconds[failure.code]
  const message = failure.code === 'INTERNAL' ? 'internal error' : failure.message
  return {
    statusCode: failure.statusCode,
    headers: {
      'vmcgi-status': failure.status,
      'content-type': 'text/plain; charset=utf-8',
      ...(retryAfter === undefined ? {} : { 'retry-after': String(retryAfter) }),
    },
    body: `vmcgi: ${failure.status}: ${message}\n`,
  }
}

/** Answers a request that failed: its status and reason if nothing was sent yet, otherwise a cut. */
export function sendFailure(request: FastifyRequest, reply: FastifyReply, error: unknown): void {
  const failure = request.exchange ? request.exchange.fail(error) : toVmcgiError(error)
  const vm = request.exchange?.lease?.vm
  const level = failure.statusCode >= 500 && failure.code !== 'OVERLOADED' ? 'warn' : 'info'
  request.log[level]({ err: failure, vm: vm?.id, console: vm?.consoleTail() || undefined }, failure.message)
  const answerable = request.exchange?.answerable ?? (!reply.raw.headersSent && !reply.raw.destroyed)
  if (reply.sent || !answerable) {
    // Mid-body: nothing honest can be added, so the client sees the stream cut.
    reply.raw.destroy()
    return
  }
  // Headers put in place for the guest's answer (its body failed before its
  // first byte) belong to that answer, not to this one.
  for (const name of reply.raw.getHeaderNames()) reply.raw.removeHeader(name)
  for (const name of Object.keys(reply.getHeaders())) reply.removeHeader(name)
  const { statusCode, headers, body } = renderFailure(failure)
  // The rest of a refused body is not worth reading: close once the answer is out.
  if (!request.raw.complete) reply.header('connection', 'close')
  reply.code(statusCode).headers(headers).send(body)
}

/**
 * Requests Node cannot parse (a broken request line, headers over its limit)
 * never reach a route; Fastify's clientErrorHandler answers them here.
 */
export function answerClientError(error: Error & { code?: string }, socket: Socket): void {
  // Mid-response (a broken request pipelined behind one being answered) there
  // is no room for an answer: hang up.
  const answering = (socket as Socket & { _httpMessage?: { headersSent?: boolean } })._httpMessage?.headersSent
  if (!socket.writable || answering) return void socket.destroy()
  const failure = error.code === 'ERR_HTTP_REQUEST_TIMEOUT'
    ? new VmcgiError('CLIENT_TIMEOUT', 'the request headers did not arrive in time')
    : new VmcgiError('BAD_REQUEST', 'the request could not be parsed', { statusCode: error.code === 'HPE_HEADER_OVERFLOW' ? 431 : 400 })
  writeFailure(socket, failure)
}

/** CONNECT asks for a tunnel, which vmcgi is not: it is answered on the socket, and logged. */
function refuseTunnel(log: FastifyBaseLogger, request: IncomingMessage, socket: Duplex): void {
  const failure = new VmcgiError('BAD_REQUEST', 'vmcgi opens no tunnels', { statusCode: 405 })
  log.info({ method: request.method, url: request.url, statusCode: failure.statusCode, vmcgiStatus: failure.status }, 'request')
  writeFailure(socket, failure)
}

/** Writes a whole answer on a raw socket and closes it. */
function writeFailure(socket: Duplex, failure: VmcgiError): void {
  const { statusCode, headers, body } = renderFailure(failure)
  socket.end([
    `HTTP/1.1 ${statusCode} ${STATUS_CODES[statusCode]}`,
    ...Object.entries(headers).map(([name, value]) => `${name}: ${value}`),
    `content-length: ${Buffer.byteLength(body)}`,
    'connection: close',
    '',
    body,
  ].join('\r\n'))
}

/** Every error a route or hook throws, and every path no route takes, is answered by sendFailure. */
export const failureResponses = fp(async (app) => {
  app.server.on('connect', (request: IncomingMessage, socket: Duplex) => refuseTunnel(app.log, request, socket))
  app.setNotFoundHandler(() => {
    throw new VmcgiError('BAD_REQUEST', 'vmcgi serves paths that start with /', { statusCode: 400 })
  })
  app.setErrorHandler((error, request, reply) => sendFailure(request, reply, error))
}, { name: 'vmcgi-failure-response' })
