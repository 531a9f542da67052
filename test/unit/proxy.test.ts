import { describe, expect, it } from 'vitest'
import { bootTimeHeader, guestFailure, toClientHeaders, toGuestHeaders } from '../../src/proxy.js'

const vm = { id: 'vm-abc', bootMs: 812, accelerated: false }

describe('toGuestHeaders', () => {
  it('adds X-Forwarded-* and appends to an existing X-Forwarded-For', () => {
    const out = toGuestHeaders(
      { host: 'example.test', 'x-forwarded-for': '203.0.113.9', accept: '*/*' },
      { ip: '127.0.0.1', proto: 'http', host: 'example.test' },
    )
    expect(out['x-forwarded-for']).toBe('203.0.113.9, 127.0.0.1')
    expect(out['x-forwarded-proto']).toBe('http')
    expect(out['x-forwarded-host']).toBe('example.test')
    expect(out.accept).toBe('*/*')
  })

  it('drops hop-by-hop headers, those named by Connection, and vmcgi-* from the client', () => {
    const out = toGuestHeaders(
      {
        connection: 'keep-alive, x-secret',
        'keep-alive': 'timeout=5',
        'x-secret': 'drop me',
        te: 'trailers',
        expect: '100-continue',
        upgrade: 'websocket',
        'proxy-authorization': 'Basic Zm9v',
        'vmcgi-status': 'OK',
        'vmcgi-vm-id': 'forged',
        'content-length': '5',
      },
      { ip: '127.0.0.1', proto: 'http', host: undefined },
    )
    expect(Object.keys(out).sort()).toEqual(['content-length', 'x-forwarded-for', 'x-forwarded-proto'])
  })
  it('drops client headers with an underscore, which CGI would take for vmcgi\'s own', () => {
    const out = toGuestHeaders(
      { x_forwarded_for: '6.6.6.6', X_Forwarded_Proto: 'https', x_forwarded_host: 'evil', vmcgi_status: 'OK', 'x-fine': 'yes' },
      { ip: '127.0.0.1', proto: 'http', host: 'example.test' },
    )
    expect(out).toEqual({ 'x-fine': 'yes', 'x-forwarded-for': '127.0.0.1', 'x-forwarded-proto': 'http', 'x-forwarded-host': 'example.test' })
  })
})

describe('toClientHeaders', () => {
  it('keeps the guest headers and adds the vmcgi ones', () => {
    const out = toClientHeaders({ 'x-powered-by': 'busybox', 'content-type': 'text/html' }, vm)
    expect(out).toEqual({
      'x-powered-by': 'busybox',
      'content-type': 'text/html',
      'vmcgi-status': 'OK',
      'vmcgi-vm-boot-time': '812 ms (hardware acceleration disabled)',
      'vmcgi-vm-id': 'vm-abc',
    })
  })

  it('does not let a guest forge vmcgi headers or pass hop-by-hop ones', () => {
    const out = toClientHeaders({ 'vmcgi-status': 'forged', connection: 'close', 'transfer-encoding': 'chunked' }, vm)
    expect(out['vmcgi-status']).toBe('OK')
    expect(out.connection).toBeUndefined()
    expect(out['transfer-encoding']).toBeUndefined()
  })

  it('says when hardware acceleration was used', () => {
    expect(bootTimeHeader({ bootMs: 95, accelerated: true })).toBe('95 ms (hardware acceleration enabled)')
  })
})

describe('guestFailure', () => {
  it.each([
    ['UND_ERR_HEADERS_TIMEOUT', 'HEADERS_TIMEOUT', 504],
    ['UND_ERR_BODY_TIMEOUT', 'BODY_TIMEOUT', 504],
    ['UND_ERR_SOCKET', 'GUEST_UNREACHABLE', 502],
    ['ECONNRESET', 'GUEST_UNREACHABLE', 502],
    ['ECONNREFUSED', 'GUEST_UNREACHABLE', 502],
    ['HPE_INVALID_CONSTANT', 'GUEST_BAD_RESPONSE', 502],
  ])('maps %s to %s', (code, expected, status) => {
    const error = Object.assign(new Error('wrapped', { cause: Object.assign(new Error('inner'), { code }) }), { code: 'FST_X' })
    const failure = guestFailure(error)
    expect(failure.code).toBe(expected)
    expect(failure.statusCode).toBe(status)
  })
})

describe('guestFailure on a response that is not HTTP', () => {
  it('maps undici\'s parser error to GUEST_BAD_RESPONSE', () => {
    const parserError = Object.assign(new Error('Response does not match the HTTP/1.1 protocol'), { name: 'HTTPParserError' })
    expect(guestFailure(new Error('wrapped', { cause: parserError })).code).toBe('GUEST_BAD_RESPONSE')
  })
})
