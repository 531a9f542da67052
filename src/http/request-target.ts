// The request target and Host, checked before any VM boots: what the guest
// is asked for, and what cannot be forwarded as it came (400 bad-request).

import { VmcgiError } from '../errors.js'

/**
 * The path to ask the guest for, from a request target as it came: the path
 * of an absolute-form target (RFC 9112 §3.2.2), whose host is never
 * contacted. The query is not part of it: it goes to the guest as it came.
 * A path with broken percent-encoding or a `..` segment is refused, as the
 * forwarding would refuse it (after the VM had booted).
 */
export function guestPath(target: string): string {
  let path = target.split('?', 1)[0]!
  if (!path.startsWith('/')) {
    try {
      path = new URL(path).pathname
    } catch {
      throw new VmcgiError('BAD_REQUEST', 'the request target is neither a path nor an absolute URL', { statusCode: 400 })
    }
  }
  let decoded
  try {
    decoded = decodeURIComponent(path)
  } catch {
    throw new VmcgiError('BAD_REQUEST', 'the path has broken percent-encoding', { statusCode: 400 })
  }
  if (decoded.split('/').includes('..')) {
    throw new VmcgiError('BAD_REQUEST', 'the path has a .. segment', { statusCode: 400 })
  }
  return path
}

/** A Host: a reg-name, IPv4 or bracketed IPv6 literal, and an optional port (RFC 9110 §7.2, RFC 3986 §3.2.2). */
const validHost = /^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]+)(:\d{0,5})?$/

/**
 * The request's one Host, or undefined for an HTTP/1.0 request without one.
 * RFC 9112 §3.2: a request with more than one Host, an invalid one, or none in
 * HTTP/1.1 gets 400.
 */
export function requestHost(rawHeaders: readonly string[], httpVersion: string): string | undefined {
  const values: string[] = []
  for (let index = 0; index < rawHeaders.length; index += 2) {
    if (rawHeaders[index]!.toLowerCase() === 'host') values.push(rawHeaders[index + 1]!)
  }
  if (values.length > 1) throw new VmcgiError('BAD_REQUEST', 'the request has more than one Host header', { statusCode: 400 })
  const [host] = values
  if (host === undefined) {
    if (httpVersion === '1.0') return undefined
    throw new VmcgiError('BAD_REQUEST', 'an HTTP/1.1 request needs a Host header', { statusCode: 400 })
  }
  if (!validHost.test(host)) throw new VmcgiError('BAD_REQUEST', 'the Host header is not a host', { statusCode: 400 })
  return host
}
