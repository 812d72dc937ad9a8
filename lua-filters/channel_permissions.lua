-- channel_permissions: a member receives a channel's events only when they may
-- see the channel (Discord's VIEW_CHANNEL), computed the way Discord does:
--
--   base   = @everyone's permissions | the member's roles' permissions
--            (everything, when the member owns the guild or has ADMINISTRATOR)
--   then the channel's overwrites, in order:
--     @everyone's overwrite (deny, then allow),
--     all the member's roles' overwrites together (deny, then allow),
--     the member's own overwrite (deny, then allow).
--
-- Where the data comes from:
--   subscription context (set by the gateway from the member's state; a role
--   change is an UpdateContext, effective from the next event):
--     guild_id          the guild (its id is also the @everyone role's id)
--     user_id           the member
--     roles             the member's role ids, comma-separated
--     role_permissions  "role_id:bits,..." for @everyone and every role of the member
--     owner             "true" when the member owns the guild
--   event headers (set by the chat API on channel-scoped events):
--     channel_id        the channel; events without it are guild-wide and pass
--     overwrites        the channel's overwrites, "id:allow:deny,..." (role or member ids)
--
-- Permission bits are decimal 64-bit integers.

-- Globals resolve through the sandbox's environment chain; locals do not.
local ipairs, tonumber, gmatch, tointeger = ipairs, tonumber, string.gmatch, math.tointeger

local VIEW_CHANNEL = 1 << 10
local ADMINISTRATOR = 1 << 3

local function parse_pairs(text)
  local map = {}
  for id, bits in gmatch(text or "", "([^:,]+):(%d+)") do
    map[id] = tointeger(tonumber(bits)) or 0
  end
  return map
end

local function parse_overwrites(text)
  local map = {}
  for id, allow, deny in gmatch(text or "", "([^:,]+):(%d+):(%d+)") do
    map[id] = { allow = tointeger(tonumber(allow)) or 0, deny = tointeger(tonumber(deny)) or 0 }
  end
  return map
end

local function roles_of(text)
  local roles = {}
  for role in gmatch(text or "", "[^,]+") do
    roles[#roles + 1] = role
  end
  return roles
end

-- What depends on the member only is computed once per context (cached in the
-- context table, which lives as long as the context); the overwrites once per event.
local function member_of(context)
  local member = context._member
  if member == nil then
    local role_permissions = parse_pairs(context.role_permissions)
    local roles = roles_of(context.roles)
    local base = role_permissions[context.guild_id] or 0
    for _, role in ipairs(roles) do
      base = base | (role_permissions[role] or 0)
    end
    member = {
      roles = roles,
      base = base,
      sees_all = context.owner == "true" or base & ADMINISTRATOR ~= 0,
    }
    context._member = member
  end
  return member
end

local function overwrites_of(event)
  local overwrites = event._overwrites
  if overwrites == nil then
    overwrites = parse_overwrites(event.headers.overwrites)
    event._overwrites = overwrites
  end
  return overwrites
end

return function(event, subscription)
  if event.headers.channel_id == nil then
    return true
  end
  local context = subscription.context
  local member = member_of(context)
  if member.sees_all then
    return true
  end
  local permissions = member.base
  local overwrites = overwrites_of(event)
  local everyone = overwrites[context.guild_id]
  if everyone then
    permissions = (permissions & ~everyone.deny) | everyone.allow
  end
  local allow, deny = 0, 0
  for _, role in ipairs(member.roles) do
    local overwrite = overwrites[role]
    if overwrite then
      allow = allow | overwrite.allow
      deny = deny | overwrite.deny
    end
  end
  permissions = (permissions & ~deny) | allow
  local own = overwrites[context.user_id]
  if own then
    permissions = (permissions & ~own.deny) | own.allow
  end
  return permissions & VIEW_CHANNEL ~= 0
end
